"""Dataloader throughput against training throughput (not a test: prints figures).

    python bench/bench_dataloader.py [--preset cpu] [--batches 200]

Makes (or reuses) a sotu lab in a temporary directory, then times make_dataloader alone. Compare
with the tokens/s that `python train.py` prints for the same preset: the loader must be at least
10x faster so it is never the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    with tempfile.TemporaryDirectory() as tmp:
        lab = Path(tmp) / "lab"
        subprocess.run([sys.executable, "-m", "autoresearch", "init", str(lab), "--preset", args.preset],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "autoresearch", "prepare"], cwd=lab, check=True, env=env,
                       stdout=subprocess.DEVNULL)
        script = f"""
import time
from prepare import MAX_SEQ_LEN, Tokenizer, make_dataloader
tok = Tokenizer.from_directory()
t0 = time.perf_counter()
loader = make_dataloader(tok, {args.batch_size}, MAX_SEQ_LEN, "train", device="cpu")
next(loader)
first = time.perf_counter() - t0
t0 = time.perf_counter()
epochs = set()
for _ in range({args.batches}):
    x, y, epoch = next(loader)
    epochs.add(epoch)
dt = time.perf_counter() - t0
tokens = {args.batches} * {args.batch_size} * MAX_SEQ_LEN
print(f"preset {args.preset}: T={{MAX_SEQ_LEN}} B={args.batch_size}: first batch {{first*1000:.0f}} ms, "
      f"{{tokens/dt/1e3:.0f}}k tokens/s over {args.batches} batches (epochs seen: {{sorted(epochs)}})")
"""
        subprocess.run([sys.executable, "-c", script], cwd=lab, check=True, env=env)


if __name__ == "__main__":
    main()
