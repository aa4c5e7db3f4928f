"""Dataloader throughput against training throughput (not a test: prints figures).

    python bench/bench_dataloader.py [--preset cpu] [--batches 200] [--producers 1,2]
    python bench/bench_dataloader.py --preset cuda   # B=128 x T=2048, vocab 8192 (init needs no GPU)

Makes a sotu lab in a temporary directory (the data and tokenizer go to, or come from, the cache), then times make_dataloader alone, for each number of
producers (tokenizing threads):

- throughput: batches taken back to back, tokens/s. Compare with the tokens/s that `python
  train.py` prints for the same preset (an H100 trains the cuda preset at ~1.7 M tokens/s): the
  loader must be faster, or the GPU waits for it;
- stall: a consumer that sleeps 1.5x the time a batch takes to make (a GPU step that is slower
  than the loader, as it must be), and the time it then spends inside next(), mean and max. The
  batches are made on a background thread while the consumer sleeps, so this should be ~0 (before,
  every next() cost the whole time of making a batch).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SCRIPT = """
import os, time
from prepare import MAX_SEQ_LEN, VOCAB_SIZE, Tokenizer, make_dataloader
B, batches, slow_batches = {batch_size}, {batches}, {slow_batches}
tok = Tokenizer.from_directory()
tokens = B * MAX_SEQ_LEN
print(f"preset {preset!r}: B={{B}} T={{MAX_SEQ_LEN}} vocab {{VOCAB_SIZE}}, {{len(os.sched_getaffinity(0))}} cores")
for producers in {producers}:
    loader = make_dataloader(tok, B, MAX_SEQ_LEN, "train", device="cpu", producers=producers)
    t0 = time.perf_counter()
    next(loader)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    epochs = set()
    for _ in range(batches):
        x, y, epoch = next(loader)
        epochs.add(epoch)
    per_batch = (time.perf_counter() - t0) / batches
    loader.close()
    print(f"  producers {{producers}}: first batch {{first*1000:.0f}} ms, {{tokens/per_batch/1e6:.2f}} M tokens/s "
          f"back to back ({{per_batch*1000:.1f}} ms a batch, {{batches}} batches, epochs {{sorted(epochs)}})")
    # the consumer "trains" 1.5x as long as a batch takes to make, then asks for the next one
    step = 1.5 * per_batch
    loader = make_dataloader(tok, B, MAX_SEQ_LEN, "train", device="cpu", producers=producers)
    next(loader)
    waits = []
    for _ in range(slow_batches):
        time.sleep(step)
        t0 = time.perf_counter()
        next(loader)
        waits.append(time.perf_counter() - t0)
    loader.close()
    print(f"  producers {{producers}}: consumer step {{step*1000:.1f}} ms: next() waited "
          f"mean {{sum(waits)/len(waits)*1000:.2f}} ms, max {{max(waits)*1000:.2f}} ms over {{slow_batches}} batches")
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--batches", type=int, default=None, help="default: 200 (cpu), 40 (cuda)")
    parser.add_argument("--slow-batches", type=int, default=30, help="batches taken by the slow consumer")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32, or 128 for the cuda preset")
    parser.add_argument("--producers", default="1,2", help="comma-separated numbers of tokenizing threads")
    args = parser.parse_args()
    big = args.preset == "cuda"
    batch_size = args.batch_size or (128 if big else 32)
    batches = args.batches or (40 if big else 200)
    producers = [int(p) for p in args.producers.split(",")]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    with tempfile.TemporaryDirectory() as tmp:
        lab = Path(tmp) / "lab"
        subprocess.run([sys.executable, "-m", "autoresearch", "init", str(lab), "--preset", args.preset],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "autoresearch", "prepare"], cwd=lab, check=True, env=env,
                       stdout=subprocess.DEVNULL)
        script = SCRIPT.format(preset=args.preset, batch_size=batch_size, batches=batches,
                               slow_batches=args.slow_batches, producers=producers)
        subprocess.run([sys.executable, "-c", script], cwd=lab, check=True, env=env)


if __name__ == "__main__":
    main()
