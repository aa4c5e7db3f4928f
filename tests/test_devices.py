"""Device detection (every branch, through injected availability) and the peak-FLOP/s figure."""

from __future__ import annotations

import json
import time

import pytest
import torch

from autoresearch import devices, settings
from autoresearch.errors import DeviceUnavailable


@pytest.fixture(autouse=True)
def _no_forced_device(monkeypatch):
    monkeypatch.delenv(devices.DEVICE_ENV, raising=False)


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_detect_prefers_cuda_then_mps_then_cpu(cuda, mps, expected):
    assert devices.detect_device(cuda_available=cuda, mps_available=mps) == torch.device(expected)


def test_prefer_argument_forces_an_available_device():
    assert devices.detect_device("cpu", cuda_available=True, mps_available=True) == torch.device("cpu")
    assert devices.detect_device("mps", cuda_available=True, mps_available=True) == torch.device("mps")
    assert devices.detect_device("cuda:1", cuda_available=True, mps_available=False) == torch.device("cuda:1")
    assert devices.detect_device("auto", cuda_available=False, mps_available=True) == torch.device("mps")


def test_environment_variable_forces_a_device(monkeypatch):
    monkeypatch.setenv(devices.DEVICE_ENV, "CPU")
    assert devices.detect_device(cuda_available=True, mps_available=True) == torch.device("cpu")
    # an explicit argument wins over the environment
    assert devices.detect_device("mps", cuda_available=False, mps_available=True) == torch.device("mps")


@pytest.mark.parametrize("wanted", ["cuda", "mps"])
def test_forced_missing_device_raises_with_a_hint(monkeypatch, wanted):
    with pytest.raises(DeviceUnavailable) as exc:
        devices.detect_device(wanted, cuda_available=False, mps_available=False)
    assert wanted in str(exc.value) and "available here: cpu" in str(exc.value)
    monkeypatch.setenv(devices.DEVICE_ENV, wanted)
    with pytest.raises(DeviceUnavailable, match=devices.DEVICE_ENV):
        devices.detect_device(cuda_available=False, mps_available=False)


def test_unknown_device_name_raises():
    with pytest.raises(DeviceUnavailable, match="unknown device 'tpu'"):
        devices.detect_device("tpu", cuda_available=False, mps_available=False)


def test_real_detection_on_this_machine():
    # whatever the machine, detection returns a device on which a tensor can be made
    device = devices.detect_device()
    assert torch.zeros(1, device=device).device.type == device.type


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("NVIDIA GeForce RTX 3090", 71e12),
        ("Tesla T4", None),
    ],
)
def test_cuda_table(name, expected):
    assert devices.cuda_table_peak(name) == expected


def test_measure_matmul_flops_is_positive_and_quick():
    started = time.perf_counter()
    flops = devices.measure_matmul_flops(torch.device("cpu"), torch.float32, size=256, max_seconds=0.05)
    # the best repeat took less than the whole call, however slow a loaded machine made both
    assert 2 * 256**3 / (time.perf_counter() - started) < flops < 1e14


def test_cpu_peak_is_the_best_of_several_shapes(monkeypatch):
    """No one shape reaches a CPU's ceiling, so the peak is the fastest of a few; a given size
    measures that square alone."""
    seen = []

    def fake_rate(device, dtype, shape, max_seconds, max_reps):
        seen.append(shape)
        return {devices.CPU_PEAK_SHAPES[-1]: 9e11}.get(shape, 8e11)

    monkeypatch.setattr(devices, "_best_rate", fake_rate)
    cpu = torch.device("cpu")
    assert devices.measure_matmul_flops(cpu) == 9e11
    assert seen == list(devices.CPU_PEAK_SHAPES) and len(seen) > 1
    seen.clear()
    assert devices.measure_matmul_flops(cpu, size=512) == 8e11
    assert seen == [(512, 512, 512)]


def test_best_rate_times_a_real_rectangular_matmul():
    started = time.perf_counter()
    flops = devices._best_rate(torch.device("cpu"), torch.float32, (64, 32, 128), max_seconds=0.05, max_reps=4)
    # not a fixed floor: 0.5 MFLOP takes ~10 µs, but a loaded machine can stall every repeat for 50 ms
    assert 2 * 64 * 32 * 128 / (time.perf_counter() - started) < flops < 1e14


def test_peak_flops_is_measured_once_then_cached(monkeypatch):
    calls = []

    def fake_measure(device, dtype=torch.bfloat16, size=None, max_seconds=0.5, max_reps=8):
        calls.append((device.type, dtype))
        return 123e9

    monkeypatch.setattr(devices, "measure_matmul_flops", fake_measure)
    cpu = torch.device("cpu")
    assert devices.peak_flops(cpu) == 123e9
    assert devices.peak_flops(cpu) == 123e9
    assert calls == [("cpu", torch.bfloat16)]
    cache = json.loads((settings.cache_dir() / devices.CACHE_FILE).read_text())
    (key,) = cache
    assert devices.processor_name() in key and torch.__version__ in key and "bfloat16" in key
    # another dtype is another entry; refresh measures again
    assert devices.peak_flops(cpu, torch.float32) == 123e9
    assert devices.peak_flops(cpu, refresh=True) == 123e9
    assert len(calls) == 3


def test_refreshed_peak_is_the_best_of_its_tries(monkeypatch):
    """A neighbour only ever slows a measurement down, so the best of several is the ceiling."""
    figures = iter([90e9, 140e9, 120e9])
    monkeypatch.setattr(devices, "measure_matmul_flops", lambda *a, **k: next(figures))
    cpu = torch.device("cpu")
    assert devices.peak_flops(cpu, refresh=True, tries=3) == 140e9
    assert devices.peak_flops(cpu) == 140e9  # and that is what train.py reads from the cache


def test_peak_flops_survives_a_corrupt_or_unwritable_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(devices, "measure_matmul_flops", lambda *a, **k: 5e9)
    path = settings.cache_dir() / devices.CACHE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    assert devices.peak_flops(torch.device("cpu")) == 5e9
    assert json.loads(path.read_text())  # rewritten whole
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(blocker / "sub"))  # a file where a directory should be
    assert devices.peak_flops(torch.device("cpu")) == 5e9


def test_real_cpu_peak_is_plausible():
    peak = devices.peak_flops(torch.device("cpu"), torch.float32)
    assert 1e8 < peak < 1e14
