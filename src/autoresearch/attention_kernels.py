"""FlashAttention-3 for CUDA runs: fetched by `prepare`, loaded offline inside the sandbox.

The original autoresearch calls `kernels.get_kernel(repo)` at the top of train.py, which downloads
the kernel from the Hugging Face hub when a run starts. A run here has no network, so the two
halves are split:

- `fetch_flash_attention` runs outside the sandbox (`autoresearch prepare`, for a lab whose preset
  device is cuda): `get_kernel` downloads the build for this machine's torch and CUDA into
  cache_dir()/kernels and imports it once, and a small record says which snapshot it was;
- `load_flash_attention` runs inside the run (train.py, through prepare.py): it imports that
  snapshot from the cache with the hub's offline switch on, so no request is ever made.

Nothing here fails a prepare or a run: without the kernel, train.py uses SDPA, and both functions
return the line that says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from . import settings

HOPPER_REPO = "varunneal/flash-attention-3"  # sm90 only, and faster there (karpathy/nanochat#540)
COMMUNITY_REPO = "kernels-community/flash-attn3"
KERNEL_VERSION = 1  # the kernel's API major version, a `v1` branch on the hub; kernels>=0.15 asks for one
RECORD = "flash-attention.json"  # in the kernels cache: which snapshot `prepare` fetched
INSTALL_HINT = "pip install 'autoresearch[cuda]'"
NOT_FETCHED = "not fetched: run autoresearch prepare"

Capability = tuple[int, int]


def kernels_cache() -> Path:
    """Where the kernels go: inside the data cache, which the sandbox keeps readable for a run."""
    return settings.cache_dir() / "kernels"


def kernel_repo(capability: Capability) -> str | None:
    """The hub repository with a FlashAttention-3 build for this CUDA compute capability, or None.

    kernels-community/flash-attn3's build.toml (huggingface/kernels-community) compiles its kernels
    for cuda-capabilities "8.0" and "9.0a". kernels accepts a plain "8.0" build on 8.x with minor >= 0
    and a "9.0a" build on exactly 9.0 (kernels/archs.py), so it covers Ampere (8.0, 8.6, 8.7) and Ada
    (8.9); karpathy/nanochat#540 ran it on A100 and RTX 30xx/40xx. Blackwell (10.x, 12.x) matches
    neither, so kernels' own arch check would refuse the build: it gets None (SDPA), as does anything
    before Ampere. Hopper gets varunneal/flash-attention-3, as in the original.
    """
    major = capability[0]
    if major == 9:
        return HOPPER_REPO
    if major == 8:
        return COMMUNITY_REPO
    return None


def _gpu(cuda_available: bool | None, capability: Capability | None) -> tuple[Capability | None, str | None]:
    """(capability, None) when a GPU with a FlashAttention-3 build is here, else (None, why not).
    The arguments replace the real checks (tests walk every branch without a GPU)."""
    if cuda_available is None or (cuda_available and capability is None):
        import torch

        cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
        if cuda_available and capability is None:
            capability = tuple(torch.cuda.get_device_capability())  # type: ignore[assignment]
    if not cuda_available:
        return None, "no CUDA device here"
    assert capability is not None
    if kernel_repo(capability) is None:
        return None, f"no FlashAttention-3 build for compute capability {capability[0]}.{capability[1]}"
    return capability, None


def _import_kernels() -> ModuleType | None:
    """The kernels package, or None when it is not installed."""
    try:
        import kernels
    except ImportError:
        return None
    module: ModuleType = kernels
    return module


@contextlib.contextmanager
def _hub_environment(offline: bool) -> Iterator[None]:
    """The settings kernels and huggingface_hub read, for one call, then put back.

    KERNELS_CACHE (kernels/hf_hub.py `_get_cache_dir`) and HF_HUB_DISABLE_PROGRESS_BARS are read
    when those packages are imported, so they are set before the import (the first import, in
    `prepare` and in a run). HF_HUB_OFFLINE is read at import too (constants.HF_HUB_OFFLINE), but
    every request checks `constants.is_offline_mode()` first and raises OfflineModeIsEnabled before
    it is sent (utils/_http.py `hf_request_event_hook`), and kernels picks its cache-only resolver
    from the same constant: so `offline` also sets it on the imported module for the call.
    """
    names = ("KERNELS_CACHE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_HUB_OFFLINE")
    saved = {name: os.environ.get(name) for name in names}
    imported = sys.modules.get("huggingface_hub.constants")
    before = getattr(imported, "HF_HUB_OFFLINE", None)
    os.environ["KERNELS_CACHE"] = str(kernels_cache())
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # the library never prints
    constants: Any = None
    try:
        if offline:
            os.environ["HF_HUB_OFFLINE"] = "1"
            from huggingface_hub import constants

            constants.HF_HUB_OFFLINE = True
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if constants is not None:  # what it was, or what the user's environment would have made it
            by_env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
            constants.HF_HUB_OFFLINE = before if imported is not None else (
                by_env.upper() in constants.ENV_VARS_TRUE_VALUES)


def _reason(exc: BaseException) -> str:
    """One line for an exception: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _snapshot_of(module: ModuleType) -> tuple[Path, str, str]:
    """(snapshot directory, revision, build variant) of a kernel module imported from the hub cache,
    whose files lie at .../snapshots/<revision>/build/<variant>/[<package>/]__init__.py."""
    path = Path(module.__file__ or "")
    parts = path.parts
    at = len(parts) - 1 - parts[::-1].index("build") if "build" in parts[:-1] else 0
    if at < 2 or parts[at - 2] != "snapshots":
        raise ValueError(f"the kernel was not imported from a hub snapshot ({path})")
    return Path(*parts[:at]), parts[at - 1], parts[at + 1]


def _record_path() -> Path:
    return kernels_cache() / RECORD


def fetch_flash_attention(log: Callable[[str], None], *, cuda_available: bool | None = None,
                          capability: Capability | None = None) -> str:
    """Download FlashAttention-3 for this GPU into the kernels cache, for runs to load offline.

    Returns the one line that says what happened: "attention: fetched REPO (build VARIANT)", or
    "attention: sdpa — WHY" (no CUDA device, no build for this GPU, kernels not installed, or why the
    download or the import failed). Never raises for those: without the kernel a run uses SDPA.
    `log` gets a line before the download starts. `cuda_available` and `capability` replace the
    real checks.
    """
    capability, why = _gpu(cuda_available, capability)
    if capability is None:
        return f"attention: sdpa — {why}"
    repo = kernel_repo(capability)
    assert repo is not None
    cache = kernels_cache()
    try:
        with _hub_environment(offline=False):
            kernels = _import_kernels()
            if kernels is None:
                return f"attention: sdpa — the kernels package is not installed ({INSTALL_HINT})"
            log(f"attention: fetching {repo} (v{KERNEL_VERSION}) into {cache}")
            # trust_remote_code: kernels loads hub code only from publishers the hub marks trusted
            # unless told otherwise, and varunneal is a user, not such an organisation. The two
            # repositories are named in this file, as in the original: naming them is the decision.
            module = kernels.get_kernel(repo, version=KERNEL_VERSION, trust_remote_code=True)
        snapshot, revision, build = _snapshot_of(module)
        module.flash_attn_interface.flash_attn_func  # noqa: B018 - what a run calls must be there
    except Exception as exc:  # noqa: BLE001 - whatever the download or the import raises, runs use SDPA
        return f"attention: sdpa — fetching {repo} failed: {_reason(exc)}"
    if cache.resolve() not in snapshot.resolve().parents:
        # kernels was imported earlier in this process with another KERNELS_CACHE: a run could not read it
        return f"attention: sdpa — {repo} went to {snapshot}, outside {cache}, where a run cannot read it"
    record = {"repo": repo, "version": KERNEL_VERSION, "revision": revision, "build": build,
              "snapshot": str(snapshot.relative_to(cache)), "capability": list(capability),
              "kernels": getattr(kernels, "__version__", "")}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = _record_path().with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, _record_path())
    return f"attention: fetched {repo} (build {build})"


def _fetched(repo: str) -> Path | None:
    """The snapshot `prepare` fetched for `repo`, when it is still in the cache."""
    try:
        record = json.loads(_record_path().read_text())
        snapshot = kernels_cache() / record["snapshot"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return snapshot if record.get("repo") == repo and (snapshot / "build").is_dir() else None


def load_flash_attention(*, cuda_available: bool | None = None,
                         capability: Capability | None = None) -> tuple[Callable[..., Any] | None, str]:
    """FlashAttention-3's `flash_attn_func` from the kernels cache, and the line to print.

    Strictly offline: the hub's offline switch is on for the call, so huggingface_hub refuses every
    request before it is sent, and the kernel is imported from the snapshot `prepare` recorded.
    Returns (flash_attn_func, "attention: fa3 (REPO)") or (None, "attention: sdpa (WHY)"). Never
    raises. `cuda_available` and `capability` replace the real checks.

    Calling convention (FA3's hopper/flash_attn_interface.py, which both repositories package):
    flash_attn_func(q, k, v, causal=True, window_size=(left, 0)) with q (B, T, H, D) and k, v
    (B, T, H_kv, D), H divisible by H_kv, bf16 or fp16 on the GPU; a query at i sees keys
    i - left .. i. It returns `out` (B, T, H, D), and (out, softmax_lse) only with
    return_attn_probs=True; earlier FA3 releases returned the pair always, so a caller that takes
    out[0] from a tuple works with both.
    """
    try:
        capability, why = _gpu(cuda_available, capability)
        if capability is None:
            return None, f"attention: sdpa ({why})"
        repo = kernel_repo(capability)
        assert repo is not None
        with _hub_environment(offline=True):
            kernels = _import_kernels()
            if kernels is None:
                return None, f"attention: sdpa (kernels not installed: {INSTALL_HINT})"
            snapshot = _fetched(repo)
            if snapshot is None:
                return None, f"attention: sdpa ({NOT_FETCHED})"
            # get_local_kernel imports the build from the directory `prepare` recorded. get_kernel
            # does not work offline here (kernels 0.17.2, huggingface_hub 2.4): by revision, the hub's
            # cache check calls the snapshot incomplete, as only this machine's build of the many was
            # downloaded; by version, there is no refs/v1, as the download was by commit.
            module = kernels.get_local_kernel(snapshot)
        func = module.flash_attn_interface.flash_attn_func
    except Exception as exc:  # noqa: BLE001 - a kernel that does not load means SDPA, never a failed run
        return None, f"attention: sdpa (loading the kernel failed: {_reason(exc)})"
    return func, f"attention: fa3 ({repo})"
