"""Module-level constants are found with ast and rewritten as text, layout intact."""

from __future__ import annotations

import pytest

from autoresearch.constants import find_constants, format_literal, set_constants
from autoresearch.errors import ConfigError

SOURCE = '''"""doc"""
import os

# Model
DEPTH = 8               # number of layers
MATRIX_LR = 0.04        # Muon learning rate; é in a comment
WINDOW_PATTERN = "SSSL" # S = half window
TOTAL_BATCH_SIZE = 2**19  # tokens per step
ADAM_BETAS = (0.8, 0.95)
EVAL = 40 * 524288
USE_X = True
lower = 3
COMPUTED = os.cpu_count()

def f():
    INNER = 1
'''


def test_finds_literals_and_arithmetic() -> None:
    found = find_constants(SOURCE)
    assert {k: v.value for k, v in found.items()} == {
        "DEPTH": 8, "MATRIX_LR": 0.04, "WINDOW_PATTERN": "SSSL", "TOTAL_BATCH_SIZE": 2**19,
        "ADAM_BETAS": (0.8, 0.95), "EVAL": 40 * 524288, "USE_X": True,
    }
    assert found["DEPTH"].line == 5


def test_rewrites_only_the_literal() -> None:
    out = set_constants(SOURCE, {"DEPTH": 4, "MATRIX_LR": 0.056, "WINDOW_PATTERN": "L",
                                 "TOTAL_BATCH_SIZE": 2**13, "ADAM_BETAS": (0.9, 0.99), "USE_X": False})
    assert "DEPTH = 4               # number of layers" in out
    assert "MATRIX_LR = 0.056       # Muon learning rate; é in a comment" in out  # comment column kept
    assert 'WINDOW_PATTERN = "L"    # S = half window' in out
    assert "TOTAL_BATCH_SIZE = 2**13  # tokens per step" in out
    assert "ADAM_BETAS = (0.9, 0.99)" in out and "USE_X = False" in out
    assert {k: v.value for k, v in find_constants(out).items()}["DEPTH"] == 4
    assert out.count("\n") == SOURCE.count("\n")


def test_unknown_name_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="NOPE"):
        set_constants(SOURCE, {"NOPE": 1})
    with pytest.raises(ConfigError):
        set_constants(SOURCE, {"COMPUTED": 1})


def test_floats_stay_floats() -> None:
    out = set_constants(SOURCE, {"MATRIX_LR": 2.0})
    assert find_constants(out)["MATRIX_LR"].value == 2.0
    assert isinstance(find_constants(out)["MATRIX_LR"].value, float)


@pytest.mark.parametrize("value,text", [(4096, "2**12"), (2.0, "2.0"), (1000, "1000"), (0.04, "0.04"), (1e-10, "1e-10"),
                                        ("a\"b", '"a\\"b"'), ((1,), "(1,)"), (True, "True")])
def test_format_literal(value: object, text: str) -> None:
    assert format_literal(value) == text
