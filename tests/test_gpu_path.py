"""The CUDA path, simulated on a CPU: what a CUDA export records, how the evaluator sizes its passes
on a GPU, which dtypes reach FlashAttention-3, which GPU a run gets and which device nodes its
sandbox binds, why a cuda lab refuses to train elsewhere, and the compile cache between runs.

No test here needs a GPU; bench/gpu_smoke.sh runs the real thing on one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from autoresearch import compile_cache, devices, gpus
from autoresearch.config import load_config
from autoresearch.errors import ConfigError, DeviceUnavailable
from autoresearch.evaluator import load_program, retarget_autocast, rows_per_pass
from autoresearch.sandbox import bwrap_argv
from conftest import REPO, run_cli
from test_loop import diff, experiments, make_target, run_loop, write_patches
from test_train_model import make_model, train  # noqa: F401  (the fixture)

# ---------------------------------------------------------------------------
# A model exported on CUDA, scored on the CPU
# ---------------------------------------------------------------------------


class Forward(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)


def exported_as_on_cuda(train, tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """The lab's GPT in bf16, exported the way prepare.hand_off does, with its autocast regions then
    made to name "cuda", which is what the same export records on a GPU. Returns the file, an input
    and the logits of the CPU export."""
    model = make_model(train, T=32, V=97, dtype="bfloat16").eval()
    x = torch.randint(0, 97, (3, 32))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        Forward(model)(x)  # fills the masks' cache with real tensors first, as prepare.hand_off does
        program = torch.export.export(Forward(model), (x,), dynamic_shapes=({0: batch},))
        expected = program.module()(x)
    assert retarget_autocast(program, "cuda") >= 1  # the GPT's forward enters one autocast region
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    return path, x, expected


def test_a_model_exported_on_cuda_is_scored_correctly_on_the_cpu(train, tmp_path: Path) -> None:
    path, x, expected = exported_as_on_cuda(train, tmp_path)
    as_saved = torch.export.load(path).module()
    with torch.no_grad(), pytest.raises(RuntimeError, match="dtype"):
        as_saved(x)  # a "cuda" autocast does nothing on the CPU: bf16 activations meet fp32 weights
    with torch.no_grad():
        got = load_program(path, "cpu")(x)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_retargeting_a_program_already_on_its_device_changes_nothing(train, tmp_path: Path) -> None:
    path, _, _ = exported_as_on_cuda(train, tmp_path)
    program = torch.export.load(path)
    assert retarget_autocast(program, "cuda") == 0
    assert retarget_autocast(program, "cpu") >= 1 and retarget_autocast(program, "cpu") == 0


# ---------------------------------------------------------------------------
# Passes of the evaluation on a GPU
# ---------------------------------------------------------------------------


def test_gpu_passes_are_sized_for_its_free_memory() -> None:
    # the cuda preset: T = 2048, V = 8192, 64 MB of fp32 logits a row
    assert rows_per_pass(2048, 8192) == 1  # the CPU rule: logits within the cache
    assert rows_per_pass(2048, 8192, "cuda", free_bytes=130 * 2**30) == 64  # an idle H200: the cap
    assert rows_per_pass(2048, 8192, "cuda:0", free_bytes=8 * 2**30) == 8  # a quarter for 4 copies
    assert rows_per_pass(2048, 8192, "cuda", free_bytes=2**20) == 1  # never zero
    assert rows_per_pass(64, 512, "cpu") == 128


# ---------------------------------------------------------------------------
# FlashAttention-3 gets bf16, the residual stream stays bf16
# ---------------------------------------------------------------------------


def test_the_cuda_path_hands_fa3_bf16_and_keeps_the_residual_stream_bf16(train, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's autocast runs rms_norm in fp32 (CPU's does not): simulate that policy, take the CUDA
    branches on the CPU, and stand in for FA3 with a kernel that accepts only fp16/bf16, as FA3 does."""
    plain_rms_norm = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", lambda x, shape, *a, **k: plain_rms_norm(x.float(), shape, *a, **k))
    monkeypatch.setattr(train, "on_gpu", lambda x: True)
    calls: list[tuple[torch.dtype, ...]] = []

    def fake_fa3(q, k, v, causal, window_size):
        calls.append((q.dtype, k.dtype, v.dtype))
        if not all(t.dtype in (torch.bfloat16, torch.float16) for t in (q, k, v)):
            raise RuntimeError("FlashAttention only supports fp16, bf16 and fp8")
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return y.transpose(1, 2)

    monkeypatch.setattr(train, "FLASH_ATTN_3", fake_fa3)
    model = make_model(train, T=32, V=97, dtype="bfloat16")
    streams: list[torch.dtype] = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: streams.append(out.dtype))
    x = torch.randint(0, 97, (2, 32))
    loss = model(x, x)
    loss.backward()
    assert calls and all(c == (torch.bfloat16,) * 3 for c in calls)
    assert streams and all(dtype == torch.bfloat16 for dtype in streams)
    assert torch.isfinite(loss)


def test_fa3_is_not_taken_for_fp32_inputs(train, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train, "on_gpu", lambda x: True)
    monkeypatch.setattr(train, "FLASH_ATTN_3", lambda *a, **k: pytest.fail("FA3 called with fp32 inputs"))
    q = torch.randn(2, 16, 2, 8)
    out = train.attention(q, q, q, 16)
    assert out.shape == q.shape and out.dtype == torch.float32


# ---------------------------------------------------------------------------
# A cuda lab never trains on another device
# ---------------------------------------------------------------------------


def test_why_cuda_cannot_be_used(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    assert "CPU-only build" in devices.cuda_problem(torch_cuda=None)
    assert "hides every GPU" in devices.cuda_problem(torch_cuda="13.0", visible="")
    assert "nvidiactl is missing" in devices.cuda_problem(torch_cuda="13.0", visible="0", dev=str(dev))
    (dev / "nvidiactl").touch()
    assert "no GPU device node" in devices.cuda_problem(torch_cuda="13.0", visible="0", dev=str(dev))
    (dev / "nvidia0").touch()
    assert "nvidia-uvm is missing" in devices.cuda_problem(torch_cuda="13.0", visible="0", dev=str(dev))
    (dev / "nvidia-uvm").touch()
    assert "address-space limit of 8.0 GiB" in devices.cuda_problem(torch_cuda="13.0", visible="0", dev=str(dev),
                                                                   address_limit=8 * 2**30)
    assert "nvidia-smi" in devices.cuda_problem(torch_cuda="13.0", visible="0", dev=str(dev), address_limit=-1)


def test_the_lab_device_is_the_presets_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(devices.DEVICE_ENV)
    assert devices.lab_device("cuda") == "cuda" and devices.lab_device("cpu") == "cpu"
    monkeypatch.setenv(devices.DEVICE_ENV, "mps")
    assert devices.lab_device("cuda") == "mps"
    monkeypatch.setenv(devices.DEVICE_ENV, "auto")
    assert devices.lab_device("mps") == "mps"


def test_a_cuda_lab_refuses_to_train_on_the_cpu_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(devices.DEVICE_ENV)
    assert run_cli("init", "lab", "--preset", "cuda", cwd=tmp_path).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != devices.DEVICE_ENV}
    env["PYTHONPATH"] = str(REPO / "src")
    proc = subprocess.run([sys.executable, "train.py"], cwd=tmp_path / "lab", env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: device 'cuda' was asked for but this process cannot use it (this torch")
    assert "CPU-only build" in last and "Traceback" not in proc.stderr


def test_the_preflight_says_why_before_any_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(devices.DEVICE_ENV)
    assert run_cli("init", "lab", "--preset", "cuda", cwd=tmp_path).returncode == 0
    device = gpus.run_device(load_config(tmp_path / "lab"))
    assert device.env == {"AUTORESEARCH_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    with pytest.raises(DeviceUnavailable, match="cannot use GPU 0: this torch .* is a CPU-only build"):
        gpus.preflight(device)


def test_memory_limit_is_refused_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(devices.DEVICE_ENV)
    assert run_cli("init", "lab", "--preset", "cuda", cwd=tmp_path).returncode == 0
    toml = tmp_path / "lab" / "autoresearch.toml"
    toml.write_text(toml.read_text().replace("[lab]\n", "[lab]\nmemory_limit_gb = 16\n", 1))
    with pytest.raises(ConfigError, match="memory_limit_gb cannot be used on CUDA"):
        gpus.run_device(load_config(tmp_path / "lab"))


# ---------------------------------------------------------------------------
# One GPU per run: CUDA_VISIBLE_DEVICES and the device nodes
# ---------------------------------------------------------------------------


def fake_driver(tmp_path: Path, gpus_by_bus: dict[str, tuple[int, str]]) -> tuple[Path, Path]:
    """A /dev with the control nodes and one node per GPU, and the driver's /proc information files."""
    dev, proc = tmp_path / "dev", tmp_path / "proc"
    dev.mkdir()
    for name in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"):
        (dev / name).touch()
    for bus, (minor, uuid) in gpus_by_bus.items():
        (dev / f"nvidia{minor}").touch()
        (proc / bus).mkdir(parents=True)
        (proc / bus / "information").write_text(f"Model: NVIDIA H200\nGPU UUID: {uuid}\nBus Location: {bus}\n"
                                                f"Device Minor: {minor}\n")
    return dev, proc


def test_a_run_gets_its_gpus_node_and_the_control_nodes_only(tmp_path: Path) -> None:
    # minors need not follow the bus order: the index is the bus order (CUDA_DEVICE_ORDER=PCI_BUS_ID)
    dev, proc = fake_driver(tmp_path, {"0000:18:00.0": (1, "GPU-aaaa"), "0000:2a:00.0": (0, "GPU-bbbb"),
                                       "0000:ab:00.0": (2, "GPU-cccc")})
    control = [str(dev / n) for n in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools")]
    assert gpus.gpu_nodes("0", str(dev), str(proc)) == (*control, str(dev / "nvidia1"))
    assert gpus.gpu_nodes("1", str(dev), str(proc)) == (*control, str(dev / "nvidia0"))
    assert gpus.gpu_nodes("GPU-cccc", str(dev), str(proc)) == (*control, str(dev / "nvidia2"))
    # no driver information: every GPU node (CUDA_VISIBLE_DEVICES still picks one)
    assert gpus.gpu_nodes("0", str(dev), str(tmp_path / "none")) == (*control, *(str(dev / f"nvidia{i}") for i in range(3)))


def test_the_gpu_comes_from_cuda_visible_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(devices.DEVICE_ENV)
    assert run_cli("init", "lab", "--preset", "cuda", cwd=tmp_path).returncode == 0
    config = load_config(tmp_path / "lab")
    dev, proc = fake_driver(tmp_path, {"0000:18:00.0": (0, "GPU-a"), "0000:2a:00.0": (1, "GPU-b")})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    device = gpus.run_device(config, dev=str(dev), proc=str(proc))
    nodes = device.nodes()
    assert device.gpu == "1" and device.env["CUDA_VISIBLE_DEVICES"] == "1" and nodes is not None
    assert str(dev / "nvidia1") in nodes and str(dev / "nvidia0") not in nodes
    (dev / "nvidia-modeset").touch()  # made after the device was chosen (as the preflight makes nvidia-uvm)
    assert str(dev / "nvidia-modeset") in (device.nodes() or ())
    assert gpus.run_device(config, gpu="0", dev=str(dev), proc=str(proc)).env["CUDA_VISIBLE_DEVICES"] == "0"


def test_bwrap_binds_exactly_the_nodes_it_is_given(tmp_path: Path) -> None:
    line = bwrap_argv("bwrap", ["true"], tmp_path, devices=["/dev/nvidiactl", "/dev/nvidia3"])
    bound = [line[i + 1] for i, word in enumerate(line) if word == "--dev-bind"]
    assert bound == ["/dev/nvidiactl", "/dev/nvidia3"]


def test_cpu_labs_get_no_gpu(tmp_path: Path) -> None:
    assert run_cli("init", "lab", "--preset", "tiny", cwd=tmp_path).returncode == 0
    device = gpus.run_device(load_config(tmp_path / "lab"))
    assert device.type == "cpu" and device.gpu is None and device.env == {"AUTORESEARCH_DEVICE": "cpu"}
    assert device.nodes() is None
    assert gpus.preflight(device) == {}


# ---------------------------------------------------------------------------
# The compile cache: the champion's, copied for each run
# ---------------------------------------------------------------------------

CACHED_BENCH = '''"""A target that reads and writes the compile cache, as torch.compile would."""
import os, pathlib

WIDTH = 10        # an integer knob

cache = pathlib.Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
seen = sorted(p.name for p in cache.glob("*")) if cache.is_dir() else []
print("saw: " + ",".join(seen))
cache.mkdir(parents=True, exist_ok=True)
(cache / f"kernel-{WIDTH}").write_text("compiled")
os.mkfifo(cache / f"pipe-{WIDTH}")  # a kept run's named pipe must not hang the next copy
print("---")
print(f"score: {abs(WIDTH - 17):.4f}")
'''


def test_a_run_sees_the_cache_of_its_champions_only(tmp_path: Path) -> None:
    repo = make_target(tmp_path, bench=CACHED_BENCH)
    def width(w: int) -> str:
        return CACHED_BENCH.replace("WIDTH = 10 ", f"WIDTH = {w} ")

    # each against the champion of its time: kept, discarded (worse), kept
    patches = [diff("bench.py", width(10), width(12), "width 12"), diff("bench.py", width(12), width(5), "width 5"),
               diff("bench.py", width(12), width(13), "width 13")]
    run_loop(repo, f"patches:{write_patches(tmp_path / 'p', patches)}", max_experiments=3)
    rows = experiments(repo)
    assert [r.status for r in rows] == ["keep", "keep", "discard", "keep"]

    def saw(row) -> str:
        line = next(line for line in Path(row.log_path).read_text().splitlines() if line.startswith("saw: "))
        return line.removeprefix("saw: ")

    assert saw(rows[0]) == ""  # the baseline starts cold
    assert saw(rows[1]) == "kernel-10"  # the baseline's cache, without its named pipe
    assert saw(rows[2]) == "kernel-10,kernel-12"
    assert saw(rows[3]) == saw(rows[2])  # not the discarded run's kernel-5
    state = repo / ".autoresearch" / compile_cache.DIRECTORY / "t1"
    assert [p.name for p in state.iterdir()] == [rows[3].commit_sha]  # the champion's only


def test_the_cache_variables_point_into_the_runs_copy(tmp_path: Path) -> None:
    copy, env = compile_cache.for_run(tmp_path / "state", "t", ("abc", None), tmp_path / "scratch")
    assert copy == tmp_path / "scratch" / compile_cache.DIRECTORY and copy.is_dir()
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH"):
        assert Path(env[name]).is_relative_to(copy)
    (copy / "x").write_text("1")
    assert compile_cache.adopt(tmp_path / "state", "t", "abc", tmp_path / "scratch")
    again, _ = compile_cache.for_run(tmp_path / "state", "t", ("abc", None), tmp_path / "scratch2")
    assert (again / "x").read_text() == "1"
    (again / "x").write_text("2")  # a re-run of the champion writes into its copy ...
    assert not compile_cache.adopt(tmp_path / "state", "t", "abc", tmp_path / "scratch2")
    assert (compile_cache.champion_cache(tmp_path / "state", "t", "abc") / "x").read_text() == "1"  # ... only


def test_devices_peak_table_tells_h200_nvl_from_h200() -> None:
    assert devices.cuda_table_peak("NVIDIA H200 NVL") == 835e12
    assert devices.cuda_table_peak("NVIDIA H200") == 989e12



@pytest.mark.slow
def test_the_gpu_smoke_script_dry_runs_on_the_cpu(tmp_path: Path, shared_cache: Path) -> None:
    """bench/gpu_smoke.sh --tiny: the device check's steps on the tiny preset, so it cannot rot
    between the sessions that have a GPU to run it on."""
    env = {**os.environ, "SMOKE_DIR": str(tmp_path), "PYTHON": sys.executable, "AUTORESEARCH_CACHE": str(shared_cache)}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_smoke.sh"), "--tiny"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "SMOKE PASSED" in proc.stdout and "judged experiments: 2" in proc.stdout
    assert "baseline #1: keep, val_bpb" in proc.stdout and "evaluation " in proc.stdout
