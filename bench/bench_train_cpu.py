"""Benchmark the lab template's train.py on this CPU: the `cpu` preset against `reference`.

Not a test: it trains for real and prints figures. For every budget it runs train.py as a
subprocess `--runs` times per configuration, alternating the configurations so that a noisy
neighbour slows them alike, and prints min / median / max of tokens/s, start-up seconds, val_bpb,
MFU and steps.

Configurations:
  cpu        the lab's train.py exactly as `autoresearch init --preset cpu --budget B` writes it for
             each budget B (the preset picks a larger model and batch for longer budgets)
  reference  the original autoresearch's model and optimizer shrunk by its README's advice for
             small machines: DEPTH 4, WINDOW_PATTERN "L", TOTAL_BATCH_SIZE 2**14, in a lab with
             MAX_SEQ_LEN 256 and a 4096-token vocabulary (every other constant as in the template)

MFU: this CPU's bf16 matmul peak drifts on a shared machine (875-1069 GFLOP/s within one hour on
a 2-core VM), so it is measured again before every run and once after the last. Each run's MFU is
its model FLOP/s over the mean of the peaks measured just before and just after it, and the peak
measured before a run is the cached figure that train.py's own mfu_percent uses.

Usage:
    python bench/bench_train_cpu.py                           # 60 s and 300 s, 3 runs each: ~35 min
    python bench/bench_train_cpu.py --budgets 60 --runs 1     # ~3 min
    python bench/bench_train_cpu.py --lab /tmp/mylab          # a prepared sotu lab's train.py as `cpu`
    python bench/bench_train_cpu.py --set cpu:DEPTH=6 --set reference:MATRIX_LR=0.03
    python bench/bench_train_cpu.py --breakdown               # also: where a step's time goes
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
TEMPLATE_TRAIN = SRC / "autoresearch" / "template" / "train.py"
REFERENCE = dict(DEPTH=4, ASPECT_RATIO=64, HEAD_DIM=128, WINDOW_PATTERN="L", TOTAL_BATCH_SIZE=2**14,
                 DEVICE_BATCH_SIZE=64)
REFERENCE_TASK = dict(max_seq_len=256, vocab_size=4096)


# ---------------------------------------------------------------------------
# Labs and train.py variants
# ---------------------------------------------------------------------------


def cli(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "autoresearch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"autoresearch {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")


def make_lab(path: Path, task: dict[str, int] | None = None, budget: float | None = None) -> Path:
    """A prepared sotu lab made with the CLI (preset cpu, optionally for a budget), its [task] values
    optionally replaced."""
    cli("init", str(path), "--dataset", "sotu", "--preset", "cpu",
        *(["--budget", f"{budget:g}"] if budget else []), cwd=path.parent)
    if task:
        toml = path / "autoresearch.toml"
        text = toml.read_text()
        for key, value in task.items():
            text, n = re.subn(rf"^{key}\s*=\s*\d+", f"{key} = {value}", text, flags=re.M)
            assert n == 1, f"no {key} in {toml}"
        toml.write_text(text)
    cli("prepare", cwd=path)
    return path


def task_values(lab: Path) -> dict[str, int]:
    text = (lab / "autoresearch.toml").read_text()
    return {key: int(re.search(rf"^{key}\s*=\s*(\d+)", text, flags=re.M).group(1)) for key in REFERENCE_TASK}


def set_constants(source: str, values: dict[str, object]) -> str:
    """Replace the literal of each module-level `NAME = literal` assignment, keeping its comment."""
    lines = source.splitlines(keepends=True)
    found = set()
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if name not in values:
            continue
        assert node.value.lineno == node.value.end_lineno, f"{name} spans lines"
        i = node.value.lineno - 1
        line = lines[i]
        old = line[node.value.col_offset : node.value.end_col_offset]
        new = repr(values[name])
        rest = line[node.value.end_col_offset :]
        if rest.lstrip().startswith("#"):  # keep the comment column where the padding allows
            pad = len(rest) - len(rest.lstrip()) + len(old) - len(new)
            rest = " " * max(2, pad) + rest.lstrip()
        lines[i] = line[: node.value.col_offset] + new + rest
        found.add(name)
    missing = set(values) - found
    assert not missing, f"train.py has no constants {sorted(missing)}"
    return "".join(lines)


def parse_overrides(items: list[str]) -> dict[str, dict[str, object]]:
    overrides: dict[str, dict[str, object]] = {"cpu": {}, "reference": {}}
    for item in items:
        config, _, assignment = item.partition(":")
        name, _, value = assignment.partition("=")
        if config not in overrides or not name or not value:
            sys.exit(f"--set takes CONFIG:NAME=VALUE with CONFIG cpu or reference, got {item!r}")
        overrides[config][name] = ast.literal_eval(value)
    return overrides


# ---------------------------------------------------------------------------
# Running and parsing
# ---------------------------------------------------------------------------


def run_train(lab: Path, script: str, budget: float) -> dict[str, float]:
    env = {**os.environ, "AUTORESEARCH_BUDGET": str(budget),
           "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    proc = subprocess.run([sys.executable, script], cwd=lab, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise RuntimeError(f"{script} in {lab} exited {proc.returncode}:\n{tail}")
    out = proc.stdout
    summary = dict(re.findall(r"^(\w+):\s+([-\d.]+)\s*$", out.split("\n---\n", 1)[1], flags=re.M))
    result = {key: float(value) for key, value in summary.items()}
    startup = float(re.search(r"^startup: ([\d.]+)s", out, flags=re.M).group(1))
    result["startup_seconds"] = startup + (wall - result["total_seconds"])  # plus interpreter start
    result["wall_seconds"] = wall
    batch = int(re.search(r"^batch: (\d+) tokens", out, flags=re.M).group(1))  # total_tokens_M is rounded
    result["tokens_per_s"] = result["num_steps"] * batch / result["training_seconds"]
    return result


def report_run(config: str, budget: float, run: int, result: dict[str, float], before: float,
               after: float) -> None:
    """Print one run, its MFU made relative to the mean of the peaks measured around it."""
    result["mfu_percent"] *= before / ((before + after) / 2)  # train.py divided by `before`
    print(f"  {config:9s} budget {budget:g}s run {run + 1}: val_bpb {result['val_bpb']:.4f}, "
          f"{result['tokens_per_s']:.0f} tok/s, MFU {result['mfu_percent']:.1f}% (peak {before / 1e9:.0f}"
          f" before, {after / 1e9:.0f} after), {result['num_steps']:.0f} steps, "
          f"startup {result['startup_seconds']:.1f}s", flush=True)


def spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return "/".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def print_table(results: dict[tuple[str, float], list[dict[str, float]]]) -> None:
    columns = [("tok/s", "tokens_per_s", ".0f"), ("startup s", "startup_seconds", ".1f"),
               ("val_bpb", "val_bpb", ".4f"), ("MFU %", "mfu_percent", ".1f"), ("steps", "num_steps", ".0f"),
               ("train s", "training_seconds", ".1f"), ("wall s", "wall_seconds", ".1f")]
    rows = [["config", "budget", "runs", *[c[0] + (" (min/med/max)" if c[0] == "val_bpb" else "") for c in columns]]]
    for (config, budget), runs in results.items():
        rows.append([config, f"{budget:g}", str(len(runs)), *[spread([r[key] for r in runs], fmt) for _, key, fmt in columns]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


# ---------------------------------------------------------------------------
# Where a step's time goes
# ---------------------------------------------------------------------------


def breakdown(lab: Path, script: str, rounds: int = 6) -> None:
    """Time one optimizer step of the script's model on random tokens, then the same step with one
    part removed at a time; the difference is that part's cost. Interleaved rounds, best of each."""
    import torch

    sys.path[:0] = [str(lab), str(SRC)]
    os.chdir(lab)

    def load(tag: str):
        spec = importlib.util.spec_from_file_location(f"bench_train_{tag}", lab / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    sys.modules.pop("prepare", None)  # another lab's prepare may be loaded already
    prepare = importlib.import_module("prepare")
    T = prepare.MAX_SEQ_LEN
    V = prepare.Tokenizer.from_directory().get_vocab_size()
    variants = {}
    for part in ("full", "attention core", "MLP", "lm_head + loss", "optimizer"):
        tr = load(part.split()[0])
        tr.keep_freed_memory()
        if part == "attention core":
            tr.attention = lambda q, k, v, window: v
        elif part == "MLP":
            tr.MLP.forward = lambda self, h: h
        elif part == "lm_head + loss":
            class NoLoss:
                @staticmethod
                def apply(h, w, targets, softcap, chunk):
                    return (h.float().sum() + w.float().sum()) * 0.0
            tr.FusedSoftcapCrossEntropy = NoLoss
        dim = -(-tr.DEPTH * tr.ASPECT_RATIO // tr.HEAD_DIM) * tr.HEAD_DIM
        config = tr.GPTConfig(sequence_len=T, vocab_size=V, n_layer=tr.DEPTH, n_head=dim // tr.HEAD_DIM,
                              n_kv_head=dim // tr.HEAD_DIM, n_embd=dim, window_pattern=tr.WINDOW_PATTERN,
                              softcap=tr.SOFTCAP, loss_chunk=tr.LOSS_CHUNK,
                              compute_dtype="bfloat16" if tr.CPU_BF16 else "float32")
        torch.manual_seed(0)
        model = tr.GPT(config)
        model.init_weights()
        optimizer = tr.build_optimizer(model, dim)
        variants[part] = (model, optimizer, part != "optimizer", tr)
    B = variants["full"][3].DEVICE_BATCH_SIZE
    x = torch.randint(0, V, (B, T))
    y = torch.randint(0, V, (B, T))

    def step(model, optimizer, with_optimizer, tr):
        model(x, y).backward()
        if with_optimizer:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {part: [] for part in variants}
    for v in variants.values():
        step(*v)
    for _ in range(rounds):
        for part, v in variants.items():
            t0 = time.perf_counter()
            step(*v)
            times[part].append(time.perf_counter() - t0)
    full = min(times["full"])
    flops = variants["full"][0].estimate_flops() * B * T
    print(f"\nwhere one forward+backward+optimizer step of {B}x{T} tokens goes ({lab.name}/{script}, best of {rounds}):")
    print(f"  full step             {full * 1e3:7.0f} ms  ({flops / full / 1e9:.0f} GFLOP/s)")
    accounted = 0.0
    for part in list(variants)[1:]:
        cost = full - min(times[part])
        accounted += cost
        print(f"  {part:20s}  {cost * 1e3:7.0f} ms  {100 * cost / full:5.1f}%")
    print(f"  {'the rest':20s}  {(full - accounted) * 1e3:7.0f} ms  {100 * (full - accounted) / full:5.1f}%"
          "  (q/k/v/o projections, norms, rotary, residuals, embeddings)")


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lab", type=Path,
                        help="a prepared sotu lab whose train.py is the `cpu` config at every budget "
                             "(default: one lab per budget, made with init --budget)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[60, 300], help="training seconds")
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration and budget")
    parser.add_argument("--configs", nargs="+", default=["cpu", "reference"], choices=["cpu", "reference"])
    parser.add_argument("--set", action="append", default=[], metavar="CONFIG:NAME=VALUE",
                        help="override a train.py constant of one configuration (repeatable)")
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of one step")
    parser.add_argument("--workdir", type=Path, help="where to make labs (default: a temporary directory)")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)

    sys.path.insert(0, str(SRC))
    import torch

    from autoresearch.devices import CPU_PEAK_SHAPES, peak_flops, processor_name

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-cpu-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t_setup = time.time()
    if args.lab:
        cpu_labs = dict.fromkeys(args.budgets, args.lab.resolve())
    else:
        cpu_labs = {budget: make_lab(workdir / f"cpu-{budget:g}s", budget=budget) for budget in args.budgets}
    ref_lab = next(iter(cpu_labs.values()))
    if "reference" in args.configs and task_values(ref_lab) != REFERENCE_TASK:
        ref_lab = make_lab(workdir / "reference", REFERENCE_TASK)
    scripts: dict[tuple[str, float], tuple[Path, str]] = {}  # (config, budget) -> (lab, script)
    if "cpu" in args.configs:
        for lab in set(cpu_labs.values()):
            (lab / "bench_cpu.py").write_text(set_constants((lab / "train.py").read_text(), overrides["cpu"]))
        scripts.update({("cpu", budget): (lab, "bench_cpu.py") for budget, lab in cpu_labs.items()})
    if "reference" in args.configs:
        source = set_constants(TEMPLATE_TRAIN.read_text(), {**REFERENCE, **overrides["reference"]})
        (ref_lab / "bench_reference.py").write_text(source)
        scripts.update({("reference", budget): (ref_lab, "bench_reference.py") for budget in args.budgets})
    print(f"labs ready in {time.time() - t_setup:.0f}s: cpu {', '.join(sorted({str(p) for p in cpu_labs.values()}))}, "
          f"reference {ref_lab}")

    device = torch.device("cpu")

    def measure_peak() -> float:  # refreshes the cached figure that train.py's MFU uses
        return peak_flops(device, refresh=True, seconds=1.0, tries=3)

    peak = measure_peak()
    print(f"{processor_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}: "
          f"bf16 matmul peak {peak / 1e9:.0f} GFLOP/s (best of 3 rounds of {len(CPU_PEAK_SHAPES)} shapes), fp32 "
          f"{peak_flops(device, torch.float32, refresh=True) / 1e9:.0f} GFLOP/s")

    results: dict[tuple[str, float], list[dict[str, float]]] = {}
    peaks = [peak]  # the peak after one run is the peak before the next
    for budget in args.budgets:
        for run in range(args.runs):
            for config in args.configs:
                lab, script = scripts[config, budget]
                result = run_train(lab, script, budget)
                peaks.append(measure_peak())
                report_run(config, budget, run, result, peaks[-2], peaks[-1])
                results.setdefault((config, budget), []).append(result)
    print()
    print_table(results)
    print(f"\nbf16 peak, measured before every run and after the last: {spread([p / 1e9 for p in peaks], '.0f')}"
          f" GFLOP/s (min/median/max of {len(peaks)}); each run's MFU is against the mean of the two around it")
    if args.breakdown:
        for lab, script in dict.fromkeys(scripts.values()):
            breakdown(lab, script)


if __name__ == "__main__":
    main()
