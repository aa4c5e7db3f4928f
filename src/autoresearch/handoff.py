"""The hand-off protocol: how a run gives its trained model to the trusted evaluator, by name.

Under `autoresearch run` the lab's frozen prepare.py does not score the model itself. Its
`evaluate_bpb` exports the model and writes `model.pt2`, then a file named `ready`, into the folder
$AUTORESEARCH_HANDOFF names (the run's `<state dir>/scratch/<id>/handoff`). The runner notices
`ready`, copies the model out of the run's reach (`<state dir>/models/<id>.pt2`, which the sandbox
hides) and times the hand-off after that copy; the trusted evaluator scores the copy in a process of
its own, and the answer comes back into the folder as `result.json`: {"val_bpb": ...} or
{"error": ...}. The run waits for it at most $AUTORESEARCH_HANDOFF_TIMEOUT seconds. A model that
cannot be exported is not handed over: prepare.py writes why into `handoff-error.json` and exits 1.

The runner's side is runner.py (_Handoff: what it refuses), the evaluator's evaluator.py, the run's
template/prepare.py (hand_off), and the folders are laid out by measurement.py. Every name they share
is here, so that none of them spells a file or a variable on its own.
"""

from __future__ import annotations

# -- the files in the hand-off folder --------------------------------------------------------------

MODEL = "model.pt2"  # the exported forward pass, written (renamed into place) by the run
READY = "ready"  # written after MODEL is complete: the runner takes the model when it appears
RESULT = "result.json"  # the evaluator's answer, written atomically by the runner
ERROR = "handoff-error.json"  # why the run could not hand over a model (it then exits 1)
HANDOFF_MAX_BYTES = 16 * 2**30  # a handed-over model larger than this is refused (the cuda preset's is ~0.1 GiB)
DEFAULT_TIMEOUT = 600.0  # seconds a run waits for RESULT when HANDOFF_TIMEOUT_ENV is not set

# -- the folders (measurement.py) ------------------------------------------------------------------

HANDOFF_DIR = "handoff"  # in a run's scratch folder, `<state dir>/scratch/<id>/handoff`: the run's, writable
MODELS_DIR = "models"  # in the state directory: the copies taken at hand-off, `<experiment id>.pt2`

# -- the environment of a run (what prepare.py reads) ----------------------------------------------

HANDOFF_ENV = "AUTORESEARCH_HANDOFF"  # the hand-off folder; set: evaluate_bpb hands over instead of scoring
HANDOFF_TIMEOUT_ENV = "AUTORESEARCH_HANDOFF_TIMEOUT"  # seconds to wait for RESULT (the eval allowance)
BUDGET_ENV = "AUTORESEARCH_BUDGET"  # training seconds of this run (prepare.TIME_BUDGET)
CACHE_ENV = "AUTORESEARCH_CACHE"  # the data cache (datasets, tokenizers); the runner always passes it
DEVICE_ENV = "AUTORESEARCH_DEVICE"  # the device the run trains on (set by gpus.run_device)
NO_TRAIN_ENV = "AUTORESEARCH_NO_TRAIN"  # set for coding assistants: prepare.py refuses to train
