"""The reply format: strict parsing, exact all-or-nothing application, precise errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from autoresearch.agents.base import AgentError
from autoresearch.agents.edits import (EditBlock, EditMismatch, FormatError, apply_edits, closest_region,
                                       describe_problem, parse_reply)

TRAIN = Path(__file__).resolve().parent.parent / "src" / "autoresearch" / "template" / "train.py"

FILES = {
    "train.py": "import math\n\nMATRIX_LR = 0.04  # Muon\nEMBED_LR = 0.6\n\n\ndef lr(step):\n    return MATRIX_LR\n",
    "model.py": "class GPT:\n    depth = 8\n",
}

REPLY = """DESCRIPTION: raise MATRIX_LR to 0.05
RATIONALE: the loss still falls fast at the end,
so a higher rate should help.

train.py
<<<<<<< SEARCH
MATRIX_LR = 0.04  # Muon
=======
MATRIX_LR = 0.05  # Muon
>>>>>>> REPLACE
"""


def block(search: str, replace: str, path: str = "train.py", index: int = 1) -> EditBlock:
    return EditBlock(path=path, search=search, replace=replace, index=index)


# -- parsing ---------------------------------------------------------------------------------------


def test_parse_plain_reply() -> None:
    parsed = parse_reply(REPLY)
    assert parsed.description == "raise MATRIX_LR to 0.05"
    assert parsed.rationale == "the loss still falls fast at the end,\nso a higher rate should help."
    assert parsed.blocks == [block("MATRIX_LR = 0.04  # Muon\n", "MATRIX_LR = 0.05  # Muon\n")]


def test_parse_whole_reply_in_a_fence_keeps_a_short_last_rationale_line() -> None:
    text = ("```\n### DESCRIPTION: lower EMBED_LR\nRATIONALE: the embeddings move too fast and\nhurt.\n\n"
            "```python\ntrain.py\n<<<<<<< SEARCH\nEMBED_LR = 0.6\n=======\nEMBED_LR = 0.4\n>>>>>>> REPLACE\n```\n```\n")
    parsed = parse_reply(text)
    assert (parsed.description, parsed.rationale) == ("lower EMBED_LR", "the embeddings move too fast and\nhurt.")
    assert apply_edits(FILES, parsed.blocks, editable=lambda p: p == "train.py") == {
        "train.py": FILES["train.py"].replace("0.6", "0.4")}


def test_parse_crlf_equals_lf() -> None:
    assert parse_reply(REPLY.replace("\n", "\r\n")) == parse_reply(REPLY)


@pytest.mark.parametrize("header, footer", [
    ("```python train.py\n", "```\n"),
    ("train.py\n```python\n", "```\n"),
    ("File: train.py\n```\n", "```\n"),
    ("**File:** `train.py`\n", ""),
    ("### train.py\n\n", ""),
    ("`train.py`:\n", ""),
    ("```train.py\n", "```\n"),
])
def test_parse_path_variants(header: str, footer: str) -> None:
    body = "<<<<<<< SEARCH\nEMBED_LR = 0.6\n=======\nEMBED_LR = 0.5\n>>>>>>> REPLACE\n"
    parsed = parse_reply(f"DESCRIPTION: lower EMBED_LR\nRATIONALE: why not.\n\n{header}{body}{footer}")
    assert parsed.blocks == [block("EMBED_LR = 0.6\n", "EMBED_LR = 0.5\n")]
    assert parsed.rationale == "why not."


def test_parse_multiple_files_and_blocks() -> None:
    text = ("**DESCRIPTION:** deeper model, lower LR\nRATIONALE: two things.\n\n"
            "```python\ntrain.py\n<<<<<<< SEARCH\nMATRIX_LR = 0.04  # Muon\n=======\nMATRIX_LR = 0.03  # Muon\n"
            ">>>>>>> REPLACE\n<<<<<<< SEARCH\nEMBED_LR = 0.6\n=======\nEMBED_LR = 0.4\n>>>>>>> REPLACE\n```\n\n"
            "model.py\n```\n<<<<<<< SEARCH\n    depth = 8\n=======\n    depth = 12\n>>>>>>> REPLACE\n```\n")
    parsed = parse_reply(text)
    assert parsed.description == "deeper model, lower LR"
    assert [(b.path, b.index) for b in parsed.blocks] == [("train.py", 1), ("train.py", 2), ("model.py", 3)]
    assert parsed.blocks[2].replace == "    depth = 12\n"
    assert parsed.rationale == "two things."


def test_parse_keeps_fences_and_blank_lines_inside_blocks() -> None:
    text = "DESCRIPTION: d\ntrain.py\n<<<<<<< SEARCH\n\n```\nx\n=======\n```\n\ny\n>>>>>>> REPLACE\n"
    assert parse_reply(text).blocks[0] == block("\n```\nx\n", "```\n\ny\n")


def test_parse_empty_replace_deletes() -> None:
    text = "DESCRIPTION: drop the import\ntrain.py\n<<<<<<< SEARCH\nimport math\n=======\n>>>>>>> REPLACE\n"
    assert parse_reply(text).blocks[0].replace == ""


@pytest.mark.parametrize("text, expected", [
    (REPLY.replace("DESCRIPTION: raise MATRIX_LR to 0.05\n", ""), "no DESCRIPTION line"),
    (REPLY.replace("raise MATRIX_LR to 0.05", ""), "DESCRIPTION line is empty"),
    ("DESCRIPTION: something\nRATIONALE: but no edit\n", "no SEARCH/REPLACE block"),
    (REPLY.replace("=======\n", ""), "block 1 (train.py) is missing its ======= line"),
    (REPLY.replace(">>>>>>> REPLACE\n", ""), "block 1 (train.py) is missing its >>>>>>> REPLACE line"),
    (REPLY.replace("<<<<<<< SEARCH\n", ""), "without a <<<<<<< SEARCH line"),
    (REPLY.replace("train.py\n<<<", "<<<"), "block 1 has no file path"),
    (REPLY.replace("0.05  # Muon\n>>>", "0.04  # Muon\n>>>"), "the edit changes nothing"),
])
def test_format_errors(text: str, expected: str) -> None:
    with pytest.raises(FormatError) as err:
        parse_reply(text)
    assert expected in str(err.value)
    assert "<<<<<<< SEARCH" in str(err.value) and "DESCRIPTION:" in str(err.value)  # shows the format


def test_missing_marker_names_the_second_block() -> None:
    second = "\ntrain.py\n<<<<<<< SEARCH\nEMBED_LR = 0.6\n=======\nEMBED_LR = 0.5\n"
    with pytest.raises(FormatError, match=r"block 2 \(train.py\) is missing its >>>>>>> REPLACE"):
        parse_reply(REPLY + second)
    with pytest.raises(FormatError, match=r"block 2 \(train.py\) is missing its ======="):
        parse_reply(REPLY + second.replace("=======\n", "") + ">>>>>>> REPLACE\n")


# -- applying --------------------------------------------------------------------------------------


def test_apply_exact_returns_only_changed_files() -> None:
    changed = apply_edits(FILES, parse_reply(REPLY).blocks)
    assert changed == {"train.py": FILES["train.py"].replace("0.04", "0.05")}


def test_sequential_blocks_see_previous_edits() -> None:
    blocks = [block("MATRIX_LR = 0.04  # Muon\n", "MATRIX_LR = 0.05  # Muon\n", index=1),
              block("MATRIX_LR = 0.05  # Muon\nEMBED_LR = 0.6\n", "MATRIX_LR = 0.06  # Muon\nEMBED_LR = 0.6\n", index=2),
              block("    depth = 8\n", "    depth = 10\n", path="model.py", index=3)]
    changed = apply_edits(FILES, blocks)
    assert "MATRIX_LR = 0.06  # Muon\n" in changed["train.py"] and changed["model.py"] == "class GPT:\n    depth = 10\n"


def test_match_must_start_at_a_line() -> None:
    with pytest.raises(EditMismatch, match="not found exactly"):
        apply_edits(FILES, [block("LR = 0.6\n", "LR = 0.7\n")])  # only inside "EMBED_LR = 0.6"


def test_mismatch_names_block_path_and_closest_lines() -> None:
    blocks = [block("import math\n", "import math, os\n", index=1),
              block("def lr(step):\n    return MATRIX_LR * 2\n", "def lr(step):\n    return 0.1\n", index=2)]
    with pytest.raises(EditMismatch) as err:
        apply_edits(FILES, blocks)
    message = str(err.value)
    assert "block 2 (train.py)" in message
    assert "lines 7-8" in message and "similarity 0.8" in message
    assert "    7 | def lr(step):" in message and "    8 |     return MATRIX_LR" in message
    assert "SEARCH line 2" in message and "line 8 of train.py" in message
    assert "No block was applied" in message


def test_whitespace_difference_is_reported_not_applied() -> None:
    with pytest.raises(EditMismatch) as err:
        apply_edits(FILES, [block("def lr(step):\n  return MATRIX_LR\n", "def lr(step):\n  return 1.0\n")])
    assert "similarity 1.00" in str(err.value) and "whitespace is ignored" in str(err.value)


def test_ambiguous_match_asks_for_more_context() -> None:
    files = {"train.py": "x = 1\ny = 2\nx = 1\n"}
    with pytest.raises(EditMismatch, match=r"occurs 2 times in train.py \(at lines 1, 3\); add neighbouring lines"):
        apply_edits(files, [block("x = 1\n", "x = 3\n")])
    assert apply_edits(files, [block("y = 2\nx = 1\n", "y = 2\nx = 3\n")]) == {"train.py": "x = 1\ny = 2\nx = 3\n"}


def test_no_op_after_applying_is_a_format_error() -> None:
    blocks = [block("EMBED_LR = 0.6\n", "EMBED_LR = 0.5\n", index=1), block("EMBED_LR = 0.5\n", "EMBED_LR = 0.6\n", index=2)]
    with pytest.raises(FormatError, match="the edit changes nothing"):
        apply_edits(FILES, blocks)


def test_paths_outside_the_editable_set_are_refused() -> None:
    with pytest.raises(AgentError, match=r"block 1: prepare.py is not an editable file \(editable: model.py, train.py\)"):
        apply_edits(FILES, [block("a\n", "b\n", path="prepare.py")])
    with pytest.raises(AgentError, match="model.py is not an editable"):
        apply_edits(FILES, [block("    depth = 8\n", "    depth = 9\n", path="model.py")], editable=lambda p: p == "train.py")
    with pytest.raises(AgentError, match="leaves the project"):
        apply_edits(FILES, [block("a\n", "b\n", path="../train.py")], editable=lambda p: True)


def test_empty_search_creates_a_new_file_only() -> None:
    create = block("", "def helper():\n    return 1\n", path="./helpers.py")
    with pytest.raises(AgentError, match="helpers.py is not an editable file"):
        apply_edits(FILES, [create])  # without an editable predicate only the given files change
    assert apply_edits(FILES, [create], editable=lambda p: p.endswith(".py")) == {"helpers.py": "def helper():\n    return 1\n"}
    with pytest.raises(EditMismatch, match="an empty SEARCH creates a new file, but train.py exists"):
        apply_edits(FILES, [block("", "x = 1\n")])
    with pytest.raises(EditMismatch, match="new.py does not exist; to create it, leave SEARCH empty"):
        apply_edits(FILES, [block("x\n", "y\n", path="new.py")], editable=lambda p: True)


def test_crlf_file_and_missing_final_newline_are_preserved() -> None:
    files = {"train.py": "a = 1\r\nb = 2"}
    assert apply_edits(files, [block("b = 2\n", "b = 3\n")]) == {"train.py": "a = 1\r\nb = 3"}


def test_describe_problem_carries_the_error_and_the_rules() -> None:
    try:
        apply_edits(FILES, [block("nothing like it\n", "x\n")])
    except EditMismatch as exc:
        text = describe_problem(exc)
    assert "not found exactly" in text and "Each block starts with the file path" in text
    assert "Reply again with the whole proposal" in text


# -- the closest-region search ---------------------------------------------------------------------


def test_closest_region_on_the_real_train_py_is_fast() -> None:
    text = TRAIN.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    assert len(lines) >= 600
    start = len(lines) // 2
    # a 40-line SEARCH recalled with every third line spaced differently
    search = "".join(line.replace("=", " = ", 1) if k % 3 == 0 else line for k, line in enumerate(lines[start:start + 40]))
    unrelated = "".join(f"value_{k} = compute(alpha, beta, {k})\n" for k in range(40))
    # CPU time of this process, not wall time: ~20 ms either way on a quiet machine, but another job
    # on the cores stretches the wall time several times over
    for query in (search, unrelated):
        began = time.process_time()
        first, last, similarity = closest_region(text, query)
        elapsed = time.process_time() - began
        assert elapsed < 0.2, elapsed
        assert last - first == 39
    assert closest_region(text, search)[:2] == (start + 1, start + 40)
    began = time.process_time()
    with pytest.raises(EditMismatch, match=f"lines {start + 1}-{start + 40}"):
        apply_edits({"train.py": text}, [block(search, "pass\n")])
    assert time.process_time() - began < 0.2
