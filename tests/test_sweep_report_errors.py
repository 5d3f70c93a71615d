"""The sweep, its cells, report, latency and budget on bad input: one ``error:`` line (exit 2),
nothing in the folders changed."""

import json
import pathlib
import shutil

import pytest

from tests.test_experiments import TINY, _module
from train.probe import budget
from train.study import experiment, latency, report, sweep

CELL = ["--config", "tiny", "--variant", "fib-linear", "--seed", "0", "--budgets", "full", "--set", *TINY]


def _snapshot(folder: pathlib.Path) -> dict:
  """Every file under ``folder`` with its content: a change, a new or a removed file shows."""
  return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _one_error(code: int, err: str) -> str:
  """The one line a refused command prints: exit status 2, no traceback."""
  assert code == 2, err[-3000:]
  assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err[-3000:]
  return err.strip()


@pytest.fixture
def root(cell, tmp_path) -> pathlib.Path:
  """A sweep root holding a copy of ``cell`` (tests/conftest.py: a finished fib-linear seed-0 cell
  of ``CELL``)."""
  shutil.copytree(cell, tmp_path / "root" / cell.name)
  return tmp_path / "root"


def test_a_finished_cell_of_another_config_is_refused_and_left_as_it_is(root):
  workdir = root / "fib-linear-s0"
  before = _snapshot(workdir)
  res = _module("train.study.experiment", "--workdir", str(workdir), *CELL[:2], "--variant", "dense", "--seed", "3",
                "--set", *TINY, timeout=300)
  line = _one_error(res.returncode, res.stderr)
  assert "holds a finished run of another config" in line and "model.variant: saved 'fib-linear'" in line, line
  assert "seed: saved 0 vs requested 3" in line, line
  assert _snapshot(workdir) == before


@pytest.mark.parametrize("item, flag", [("seed=3", "--seed"), ("model.variant=dense", "--variant")])
def test_experiment_refuses_the_cells_own_keys_in_set(tmp_path, capsys, item, flag):
  code = experiment.main(["--workdir", str(tmp_path / "c"), *CELL, item])
  line = _one_error(code, capsys.readouterr().err)
  assert f"--set {item}" in line and f"given by {flag}" in line, line
  assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("item, flag", [("seed=3", "--seeds"), ("model.variant=dense", "--variants")])
def test_sweep_refuses_the_cells_own_keys_in_set(tmp_path, capsys, item, flag):
  code = sweep.main(["--root", str(tmp_path / "r"), "--config", "tiny", "--variants", "fib-linear", "--set", *TINY,
                     item])
  line = _one_error(code, capsys.readouterr().err)
  assert f"--set {item}" in line and f"given by {flag}" in line, line
  assert not (tmp_path / "r").exists()


def test_sweep_root_under_a_file_is_one_error_line(tmp_path, capsys):
  (tmp_path / "afile").write_text("mine")
  code = sweep.main(["--root", str(tmp_path / "afile" / "sub"), "--config", "tiny", "--variants", "dense",
                     "--set", *TINY])
  assert "cannot create the sweep root" in _one_error(code, capsys.readouterr().err)
  assert (tmp_path / "afile").read_text() == "mine"


def test_a_corrupt_sweep_json_is_named(tmp_path, capsys):
  (tmp_path / "r").mkdir()
  (tmp_path / "r" / "sweep.json").write_text("{bad")
  code = sweep.main(["--root", str(tmp_path / "r"), "--config", "tiny", "--variants", "dense", "--set", *TINY])
  line = _one_error(code, capsys.readouterr().err)
  assert f"{tmp_path / 'r' / 'sweep.json'} is not valid JSON" in line, line
  assert (tmp_path / "r" / "sweep.json").read_text() == "{bad"


def test_the_same_overrides_in_another_order_are_the_same_recipe(tmp_path):
  sweep.check_root(tmp_path / "r", {"config": "tiny", "overrides": TINY})
  saved = (tmp_path / "r" / "sweep.json").read_text()
  sweep.check_root(tmp_path / "r", {"config": "tiny", "overrides": TINY[::-1]})
  with pytest.raises(ValueError, match="another recipe"):
    sweep.check_root(tmp_path / "r", {"config": "tiny", "overrides": [*TINY, "steps=5"]})
  assert (tmp_path / "r" / "sweep.json").read_text() == saved


def test_report_refuses_a_root_mixing_recipes(root, capsys):
  other = root / "dense-s0"
  shutil.copytree(root / "fib-linear-s0", other)
  cfg = json.loads((other / "config.json").read_text())
  cfg["model"].update(variant="dense", d_model=64)
  (other / "config.json").write_text(json.dumps(cfg))
  before = _snapshot(root)
  line = _one_error(report.main([str(root)]), capsys.readouterr().err)
  assert "more than one recipe (dense-s0 and fib-linear-s0 differ in model.d_model)" in line, line
  assert _snapshot(root) == before


@pytest.mark.parametrize("damage, message", [
    ("passkey", "is missing"),
    ("files", "no 'files' in it"),
])
def test_report_names_a_damaged_cell(root, capsys, damage, message):
  cell_json = root / "fib-linear-s0" / "cell.json"
  record = json.loads(cell_json.read_text())
  if damage == "files":
    del record["files"]
    cell_json.write_text(json.dumps(record))
  else:
    (root / "fib-linear-s0" / record["files"][damage]).unlink()
  before = _snapshot(root)
  line = _one_error(report.main([str(root)]), capsys.readouterr().err)
  assert message in line and "fib-linear-s0" in line and f"remove {cell_json}" in line, line
  assert _snapshot(root) == before


@pytest.mark.parametrize("where", ["folder", "missing folder"])
def test_report_checks_summary_before_writing_anything(root, tmp_path, capsys, where):
  target = tmp_path / "out" if where == "folder" else tmp_path / "nope" / "SUMMARY.md"
  if where == "folder":
    target.mkdir()
  before = _snapshot(root)
  line = _one_error(report.main([str(root), "--summary", str(target)]), capsys.readouterr().err)
  assert f"--summary {target}" in line, line
  assert _snapshot(root) == before and not (tmp_path / "nope").exists()


def test_budget_next_to_a_file_named_budget_is_one_error_line(root, capsys):
  workdir = root / "fib-linear-s0"
  shutil.rmtree(workdir / "budget")
  (workdir / "budget").write_text("mine")
  before = _snapshot(workdir)
  line = _one_error(budget.main(["--workdir", str(workdir), "--budgets", "full"]), capsys.readouterr().err)
  assert f"{workdir / 'budget'} is a file" in line, line
  assert _snapshot(workdir) == before


def test_latency_names_a_foreign_config(tmp_path, capsys):
  (tmp_path / "x").mkdir()
  (tmp_path / "x" / "config.json").write_text(json.dumps({"name": "not fibjax"}))
  (tmp_path / "x" / "eval.json").write_text("{}")
  before = _snapshot(tmp_path)
  line = _one_error(latency.main([str(tmp_path)]), capsys.readouterr().err)
  assert f"{tmp_path / 'x' / 'config.json'} is not a fibjax config" in line, line
  assert _snapshot(tmp_path) == before


def test_a_finished_cell_probed_again_keeps_its_record_and_times_only_its_own_probes(tmp_path):
  """A hand rerun of a finished cell without the sweep's ``progress=false`` says the same cell: its
  ``cell.json`` is kept; a record written again times the probes from this invocation's start, not
  from when training ended."""
  cell = tmp_path / "fib-linear-s0"
  cell.mkdir()
  (cell / "metrics.jsonl").write_text('{"event": "start", "time": 100.0}\n{"step": 4, "time": 130.0}\n')
  (cell / "eval.json").write_text("{}\n")
  ended = (cell / "eval.json").stat().st_mtime
  swept = {**experiment.cell_record(cell, "fib-linear", 0, "tiny", [*TINY, "progress=false"], 4, {}, ended + 5),
           "peak_bytes": None}  # as run_cell writes it
  assert swept["train_s"] == 30.0 and swept["probe_s"] == pytest.approx(5.0)
  experiment.write_record(cell / "cell.json", swept)
  again = {**experiment.cell_record(cell, "fib-linear", 0, "tiny", TINY, 4, {}, ended + 1000, started=ended + 990),
           "peak_bytes": None}
  assert again["probe_s"] == pytest.approx(10.0)
  assert experiment.write_record(cell / "cell.json", again) == swept
  assert json.loads((cell / "cell.json").read_text()) == swept
  other = {**experiment.cell_record(cell, "fib-linear", 0, "tiny", [*TINY, "steps=8"], 4, {}, ended + 1000,
                                    ended + 990), "peak_bytes": None}
  assert experiment.write_record(cell / "cell.json", other) == other  # another recipe: recorded anew
