"""Which device to train on, and how many FLOP/s it can do at best.

`detect_device` picks CUDA, then Apple MPS, then the CPU; a preference (argument or
$AUTORESEARCH_DEVICE) forces one and fails loudly when that device is missing, saying why (for
CUDA: a CPU build of torch, CUDA_VISIBLE_DEVICES hiding every GPU, missing driver device nodes, an
address-space limit). `lab_device` is the device a lab trains and is scored on: its preset's.

`peak_flops` is the denominator of the model FLOPs utilisation (MFU) that train.py prints. For
NVIDIA GPUs it comes from the vendor's dense bf16 tensor-core figure; for anything else (CPUs, Apple
GPUs, GPUs missing from the table) it is measured with large matmuls (on CPUs the best of a few
shapes) and cached per machine, so the measurement costs start-up time once.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from . import settings
from .errors import DeviceUnavailable

DEVICE_TYPES = ("cuda", "mps", "cpu")
DEVICE_ENV = "AUTORESEARCH_DEVICE"
CACHE_FILE = "peak_flops.json"

# Dense (not 2:4 sparse) bf16 tensor-core peaks in FLOP/s, from NVIDIA's data sheets. Matched as
# substrings of torch.cuda.get_device_name(), first match wins, so more specific names come first.
# GeForce cards are listed at their fp32-accumulate rate, the one bf16 training uses.
CUDA_PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200 NVL", 835e12),  # the PCIe card: lower clocks and power than the SXM module
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM; its name reads "NVIDIA H100 80GB HBM3"
    ("H800", 989e12),
    ("H20", 148e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 6000 Ada", 364e12),
    ("RTX A6000", 155e12),
    ("RTX 5090", 210e12),
    ("RTX 4090", 165e12),
    ("RTX 4080", 97e12),
    ("RTX 3090", 71e12),
    ("RTX 3080", 59e12),
)


# ---------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def detect_device(
    prefer: str | None = None,
    *,
    cuda_available: bool | None = None,
    mps_available: bool | None = None,
) -> torch.device:
    """The device to train on: `prefer`, else $AUTORESEARCH_DEVICE, else CUDA -> MPS -> CPU.

    `cuda_available` and `mps_available` replace the real checks (tests use them to walk every
    branch on a machine that has neither). A forced device that is missing raises
    DeviceUnavailable; an unknown name raises it too.
    """
    choice = (prefer or os.environ.get(DEVICE_ENV) or "").strip().lower()
    has_cuda = _cuda_available() if cuda_available is None else cuda_available
    has_mps = _mps_available() if mps_available is None else mps_available
    present = {"cuda": has_cuda, "mps": has_mps, "cpu": True}
    if not choice or choice == "auto":
        for kind in DEVICE_TYPES:
            if present[kind]:
                return torch.device(kind)
    kind = choice.split(":", 1)[0]
    if kind not in present:
        raise DeviceUnavailable(
            f"unknown device {choice!r}",
            f"use one of: auto, {', '.join(DEVICE_TYPES)} (argument or ${DEVICE_ENV})",
        )
    if not present[kind]:
        found = ", ".join(k for k in DEVICE_TYPES if present[k])
        why = f" ({cuda_problem()})" if kind == "cuda" and cuda_available is None else ""
        raise DeviceUnavailable(
            f"device {kind!r} was asked for but this process cannot use it{why}",
            f"available here: {found}; fix the cause, unset ${DEVICE_ENV}, or make a lab for this machine "
            "(autoresearch init --preset auto)",
        )
    return torch.device(choice)


def lab_device(preset_device: str) -> str:
    """The device type a lab's runs train on and its evaluator scores on: $AUTORESEARCH_DEVICE when
    set, else the one its preset is sized for. Never a guess: a cuda lab whose run cannot see the
    GPU must fail, not train a 50 M-parameter model on the CPU until its time runs out."""
    choice = (os.environ.get(DEVICE_ENV) or "").strip().lower()
    if choice and choice != "auto":
        return choice.split(":", 1)[0]
    return preset_device


def cuda_problem(
    *,
    torch_cuda: str | None | bool = True,
    visible: str | None = None,
    dev: str = "/dev",
    address_limit: int | None = None,
) -> str:
    """Why CUDA is not usable in this process, as a clause that says what to check. The keyword
    arguments replace what is read from this process (tests walk every branch with them):
    `torch_cuda` torch.version.cuda, `visible` $CUDA_VISIBLE_DEVICES, `dev` where device nodes
    live, `address_limit` the soft RLIMIT_AS in bytes (-1: none)."""
    built = torch.version.cuda if torch_cuda is True else torch_cuda
    if not built:
        return f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA build of torch"
    shown = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if shown is not None and shown.strip() in ("", "-1", "none", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={shown!r} hides every GPU"
    if not os.path.exists(os.path.join(dev, "nvidiactl")):
        return (f"{dev}/nvidiactl is missing: no NVIDIA driver here (check nvidia-smi; "
                "in a container, start it with the GPUs, e.g. docker run --gpus all)")
    if not glob.glob(os.path.join(dev, "nvidia[0-9]*")):
        return f"no GPU device node ({dev}/nvidia0, ...) is visible to this process"
    if not os.path.exists(os.path.join(dev, "nvidia-uvm")):
        return (f"{dev}/nvidia-uvm is missing: the driver makes it when a CUDA program first runs "
                "outside a sandbox (run nvidia-smi -L, or `nvidia-modprobe -u -c=0` as root)")
    limit = resource.getrlimit(resource.RLIMIT_AS)[0] if address_limit is None else address_limit
    if limit not in (-1, resource.RLIM_INFINITY):
        return (f"an address-space limit of {limit / 2**30:.1f} GiB (memory_limit_gb, or ulimit -v) "
                "keeps the CUDA driver from starting: remove it")
    return "torch.cuda.is_available() is False: check nvidia-smi and that the driver supports this torch's CUDA " \
           f"{built}"


# ---------------------------------------------------------------------------
# Peak FLOP/s
# ---------------------------------------------------------------------------


def cuda_table_peak(name: str) -> float | None:
    """The data-sheet bf16 peak of the NVIDIA GPU called `name`, or None when not in the table."""
    for key, flops in CUDA_PEAK_BF16:
        if key.lower() in name.lower():
            return flops
    return None


def processor_name() -> str:
    """A human-readable CPU model name ("AMD EPYC 9B45"); falls back to platform strings."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# (m, k, n) shapes whose best rate is the CPU's peak. No single shape reaches the ceiling: on 2
# Zen 5 cores a 2048^3 bf16 matmul ran at 918-959 GFLOP/s, 1024^3 at 946-993, and 4096x256 @
# 256x1024 (a small transformer's MLP) at 1009-1030, the chip's 2 x 128 FLOP/cycle at ~4 GHz.
# Taking the square one alone would let a model's MFU pass 100%.
CPU_PEAK_SHAPES = ((2048, 2048, 2048), (1024, 1024, 1024), (4096, 256, 1024))


def measure_matmul_flops(
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    size: int | None = None,
    max_seconds: float = 0.5,
    max_reps: int = 8,
) -> float:
    """Best FLOP/s of dense matmuls, over up to `max_reps` timed repeats per shape: a `size`-square
    one if given, else an 8192-square one on CUDA, 4096 on MPS and CPU_PEAK_SHAPES on the CPU.

    The best repeat, not the mean: the aim is the machine's ceiling, and on a shared machine other
    processes only ever make a repeat slower. On 2 Zen 5 cores the CPU shapes take ~0.3 s in bf16
    and ~1.2 s in fp32 (~210 GFLOP/s); `max_seconds` is shared among the shapes.
    """
    if size is not None:
        shapes = ((size, size, size),)
    elif device.type == "cpu":
        shapes = CPU_PEAK_SHAPES
    else:
        side = 8192 if device.type == "cuda" else 4096
        shapes = ((side, side, side),)
    return max(_best_rate(device, dtype, shape, max_seconds / len(shapes), max_reps) for shape in shapes)


def _best_rate(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int], max_seconds: float,
               max_reps: int) -> float:
    m, k, n = shape
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    (a @ b)  # warm-up: the first call pays for kernel selection and page faults
    _synchronize(device)
    best = float("inf")
    start = time.perf_counter()
    for _ in range(max_reps):
        t0 = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds:
            break
    return 2.0 * m * k * n / best


def _cache_key(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = processor_name()
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    # "peak 2": the CPU figure became the best of CPU_PEAK_SHAPES; older figures are measured again
    return f"peak 2|{device.type}|{name}|torch {torch.__version__}|threads {threads}|{dtype}"


def _cache_path() -> Path:
    return settings.cache_dir() / CACHE_FILE


def _read_cache() -> dict[str, float]:
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, value: float) -> None:
    path = _cache_path()
    data = _read_cache()
    data[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(path)  # atomic: two labs starting at once never see half a file
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time


def peak_flops(
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    refresh: bool = False,
    seconds: float = 0.5,
    tries: int = 1,
) -> float:
    """Peak dense matmul FLOP/s of `device` in `dtype`: the data sheet for known NVIDIA GPUs,
    otherwise measured once per (processor, torch version, thread count, dtype) and cached in
    settings.cache_dir(). `refresh=True` measures again (the best of `tries` measurements of up to
    `seconds` each) and overwrites the cached figure: a benchmark does that to relate its runs to
    the peak of the same moment.
    """
    device = torch.device(device)
    if device.type == "cuda" and dtype == torch.bfloat16:
        table = cuda_table_peak(torch.cuda.get_device_name(device))
        if table is not None:
            return table
    key = _cache_key(device, dtype)
    if not refresh:
        cached = _read_cache().get(key)
        if isinstance(cached, (int, float)) and cached > 0:
            return float(cached)
    value = max(measure_matmul_flops(device, dtype, max_seconds=seconds, max_reps=max(8, int(seconds * 16)))
                for _ in range(max(1, tries)))
    _write_cache(key, value)
    return value
