"""Which device a lab's runs train on, and how a run is given exactly one GPU.

A run of a cuda lab sees one GPU: CUDA_VISIBLE_DEVICES names it (in PCI bus order, the order of
nvidia-smi and of the driver's device minors, not CUDA's fastest-first order), and the sandbox binds
that GPU's device node and the driver's control nodes only. The trusted evaluator gets the same
variables, so it scores on the GPU the run trained on. Before the first run, the loop checks outside
the sandbox that CUDA starts there (which also makes the driver create /dev/nvidia-uvm, a node a
sandboxed process cannot create), so a broken setup is one line at once, not a night of crashes.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import LabConfig
from .devices import cuda_problem, lab_device
from .errors import ConfigError, DeviceUnavailable
from .presets import get_preset

# Nodes every CUDA process opens besides its GPU's /dev/nvidiaN (nvidia-caps: MIG and capabilities)
CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "nvidia-caps")
PROC_GPUS = "/proc/driver/nvidia/gpus"
_PREFLIGHT_SECONDS = 120.0


@dataclass(frozen=True)
class RunDevice:
    """Where a lab's runs train and are scored."""

    type: str  # cuda, mps or cpu
    gpu: str | None = None  # the one CUDA_VISIBLE_DEVICES entry a cuda run gets
    env: dict[str, str] = field(default_factory=dict)  # for the run and the evaluator alike
    dev: str = "/dev"
    proc: str = PROC_GPUS

    def nodes(self) -> tuple[str, ...] | None:
        """The device nodes the sandbox binds for a run, looked up when the run starts (the CUDA
        preflight may just have made /dev/nvidia-uvm); None for a run that has no GPU of its own."""
        return None if self.gpu is None else gpu_nodes(self.gpu, self.dev, self.proc)


def run_device(config: LabConfig, gpu: str | None = None, dev: str = "/dev", proc: str = PROC_GPUS) -> RunDevice:
    """The device of `config`'s runs. For a cuda lab, `gpu` (an index in PCI bus order or a GPU UUID)
    else the first entry of $CUDA_VISIBLE_DEVICES, else 0. Other targets and labs: the CPU or MPS,
    with nothing set."""
    if config.task is None:
        return RunDevice("cpu")
    kind = lab_device(get_preset(config.task.preset).device)
    if kind != "cuda":
        return RunDevice(kind, env={"AUTORESEARCH_DEVICE": kind})
    if config.memory_limit_gb:
        raise ConfigError("autoresearch.toml: [lab] memory_limit_gb cannot be used on CUDA",
                          "it caps address space (RLIMIT_AS), and the CUDA driver maps far more than the "
                          "memory it uses, so no run could start: remove memory_limit_gb")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    chosen = (gpu or (visible.split(",")[0].strip() if visible and visible.strip() else "") or "0").strip()
    env = {"AUTORESEARCH_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": chosen, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    return RunDevice("cuda", chosen, env, dev, proc)


def gpu_nodes(gpu: str, dev: str = "/dev", proc: str = PROC_GPUS) -> tuple[str, ...]:
    """The device nodes a run on `gpu` needs: the control nodes that exist, and /dev/nvidiaN of that
    GPU, N being the driver's minor number (from /proc/driver/nvidia/gpus/<bus id>/information).
    Without that information (no driver, an unknown GPU), every /dev/nvidiaN: the run then sees the
    other GPUs' nodes, but CUDA_VISIBLE_DEVICES still gives it one."""
    nodes = [os.path.join(dev, name) for name in CONTROL_NODES if os.path.exists(os.path.join(dev, name))]
    minor = _minor_of(gpu, proc)
    if minor is None:
        nodes += sorted(p for p in glob.glob(os.path.join(dev, "nvidia*")) if re.fullmatch(r"nvidia\d+", Path(p).name))
    elif os.path.exists(os.path.join(dev, f"nvidia{minor}")):
        nodes.append(os.path.join(dev, f"nvidia{minor}"))
    return tuple(nodes)


def _minor_of(gpu: str, proc: str) -> int | None:
    """The device minor of `gpu`: an index in PCI bus order, or a UUID (GPU-...) or a prefix of one."""
    found = []
    for info in sorted(glob.glob(os.path.join(proc, "*", "information"))):  # directories named by bus id
        try:
            text = Path(info).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        minor = re.search(r"^Device Minor:\s*(\d+)", text, re.M)
        uuid = re.search(r"^GPU UUID:\s*(\S+)", text, re.M)
        if minor:
            found.append((int(minor.group(1)), uuid.group(1) if uuid else ""))
    if gpu.isdigit():
        index = int(gpu)
        return found[index][0] if index < len(found) else None
    matches = [minor for minor, uuid in found if uuid and uuid.startswith(gpu)]
    return matches[0] if len(matches) == 1 else None


_PROBE = """
import json, torch
from autoresearch.devices import cuda_problem
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info(0)
    print(json.dumps({"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                      "free_gb": free / 2**30, "total_gb": total / 2**30}))
else:
    print(json.dumps({"problem": cuda_problem()}))
"""


def preflight(device: RunDevice, timeout: float = _PREFLIGHT_SECONDS) -> dict[str, object]:
    """Check, outside the sandbox and in a process of its own with the run's variables, that CUDA
    starts on the run's GPU: its name, count and memory, or DeviceUnavailable saying why not."""
    if device.type != "cuda":
        return {}
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, **device.env}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        found = {"problem": f"CUDA did not start within {timeout:g}s (a hung driver? check nvidia-smi)"}
    except (OSError, ValueError, IndexError):
        found = {"problem": cuda_problem()}
    if "problem" in found:
        raise DeviceUnavailable(f"this cuda lab's runs cannot use GPU {device.gpu}: {found['problem']}",
                                "fix that, or choose another GPU with CUDA_VISIBLE_DEVICES")
    return found
