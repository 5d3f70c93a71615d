"""``python -m train.compare``: two synthetic sweep roots (``tests.test_findings``' cells) paired by
variant and seed, the differences exact; and its refusals (one line, exit code 2, nothing written)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from tests.test_findings import REPO, SEEDS, _set_accuracy, cells, write_root
from train.study import compare, findings


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, pathlib.Path]:
  """``a``: the task cells with fib-linear recalling 0.9 in every bucket; ``b``: the same cells with
  fib-linear at 0.6 (seed 4 left out); ``text``: the text cells."""
  base = tmp_path_factory.mktemp("compare")
  task = cells(task=True)
  b = [c for c in _set_accuracy(task, "fib-linear", lambda lo: 0.6) if (c["variant"], c["seed"]) != ("fib-linear", 4)]
  return {"a": write_root(base / "a", _set_accuracy(task, "fib-linear", lambda lo: 0.9)),
          "b": write_root(base / "b", b), "text": write_root(base / "text", cells(task=False))}


def _row(text: str, variant: str) -> list[str]:
  line = next(line for line in text.splitlines() if line.startswith(f"| {variant} |"))
  return [cell.strip() for cell in line.strip("|").split(" | ")]


def test_differences_are_paired_by_variant_and_seed(roots):
  text = compare.compare(roots["a"], roots["b"])
  row = _row(text, "fib-linear")
  # A recalls 0.9, B 0.6 at every length: recall error 30 points lower in A, at the 4 seeds both hold
  assert row[1:4] == ["-30.0 points [-30.0, -30.0] (n=4)"] * 3, row
  assert row[4] == ", ".join(f"s{s} -30.0 points" for s in SEEDS if s != 4)
  for variant in ("dense", "fib-fixed", "window"):  # the same cells in both roots
    assert _row(text, variant)[1] == "+0.0 points [+0.0, +0.0] (n=5)", variant
  assert "A minus B in recall error (percentage points)" in text
  assert "- A differs in: `nothing`; B in: `nothing`" in text


def test_recipes_differences_head_the_table(roots, tmp_path):
  a = tmp_path / "a"
  b = tmp_path / "b"
  for root, overrides in ((a, ["deterministic=true", "model.num_heads=4"]), (b, ["deterministic=true"])):
    root.mkdir()
    for cell in roots["a" if root == a else "b"].iterdir():
      (root / cell.name).symlink_to(cell, target_is_directory=True)
    (root / "sweep.json").write_text(json.dumps({"config": "recall", "overrides": overrides}))
  text = compare.compare(a, b)
  assert "- A differs in: `model.num_heads=4`; B in: `nothing`" in text


@pytest.mark.parametrize("which, words", [
    (("a", "a"), "are the same root"),
    (("a", "text"), "is judged on recall error and"),
    (("a", "missing"), "is not a folder"),
])
def test_refusals_are_one_line(roots, which, words):
  paths = [roots.get(w, roots["a"].parent / w) for w in which]
  res = subprocess.run([sys.executable, "-m", "train.compare", *map(str, paths)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  err = res.stderr.strip().splitlines()
  assert res.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], res.stderr


def test_no_common_cell_is_refused(roots, tmp_path):
  only = write_root(tmp_path / "only", [c for c in cells(task=True) if c["variant"] == "fib-linear" and c["seed"] == 4])
  with pytest.raises(ValueError, match="share no finished"):
    compare.compare(only, roots["b"])


def test_out_is_written_once_and_never_replaced(roots, tmp_path, capsys):
  out = tmp_path / "cmp.md"
  assert compare.main([str(roots["a"]), str(roots["b"]), "--out", str(out)]) == 0
  assert out.read_text() == capsys.readouterr().out and "| fib-linear |" in out.read_text()
  out.write_text("mine\n")
  assert compare.main([str(roots["a"]), str(roots["b"]), "--out", str(out)]) == 2
  assert "exists and is never replaced" in capsys.readouterr().err and out.read_text() == "mine\n"
  assert findings.RECALL.name == "recall error"
