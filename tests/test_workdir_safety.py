"""A workdir never loses what it holds: a folder with another run's outputs or config (but no
checkpoint to resume) is refused, a second trainer into a folder being trained in is refused, and
a workdir overlapping the ``--data`` folder is refused, each in one line with nothing written.
In-process runs of ``python -m train``'s ``main`` (seed 0, 2 steps)."""

import contextlib
import fcntl
import json
import pathlib
import shutil
from typing import Iterator

import pytest

from configs.base import TrainConfig, apply_overrides
from tests.test_resume_config import BASE, _files, _refused
from tests.test_train import FAST
from train.run import rundir
from train.probe import evaluate
from train.run.restore import load_run, retrain_command
from train.__main__ import main


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> pathlib.Path:
  """A finished 2-step tiny run (seed 0, variant fib-linear) with checkpoints 1 and 2; tests copy it.
  It trains into a folder of unrelated files and a lock file an earlier trainer left behind: neither
  counts as a run."""
  workdir = tmp_path_factory.mktemp("safety") / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine\n")
  (workdir / rundir.LOCK).touch()
  assert main(["--workdir", str(workdir), "--set", *BASE]) == 0
  assert (workdir / "notes.txt").read_text() == "mine\n" and (workdir / "checkpoints" / "2").is_dir()
  return workdir


def _stale(base_run: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  """A run stopped before its first checkpoint: a copy of the finished run without its checkpoints
  and final evaluations (config and metrics remain)."""
  workdir = _without_checkpoints(base_run, tmp_path)
  (workdir / rundir.EVAL).unlink()
  shutil.rmtree(workdir / rundir.EVALS)
  return workdir


def _without_checkpoints(base_run: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  """A copy of the finished run whose checkpoints were deleted (as a committed study's are)."""
  workdir = pathlib.Path(shutil.copytree(base_run, tmp_path / "stale"))
  shutil.rmtree(workdir / "checkpoints")
  return workdir


@contextlib.contextmanager
def _held_lock(workdir: pathlib.Path) -> Iterator[None]:
  """Holds the workdir's training lock as another trainer would."""
  with (workdir / rundir.LOCK).open("a") as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    yield


def _corpus(folder: pathlib.Path) -> pathlib.Path:
  folder.mkdir(parents=True)
  (folder / "book.txt").write_text("The quick brown fox jumps over the lazy dog. " * 50)
  return folder


def test_another_config_without_a_checkpoint_is_refused_and_untouched(base_run, tmp_path, capsys):
  """The finished run's copy without its checkpoints, asked for another variant: refused, or the new
  run would overwrite the old one's metrics and report its cached evaluations."""
  workdir = _stale(base_run, tmp_path)
  before = _files(workdir)
  argv = ["--config", "tiny", "--variant", "dense", "--set", *FAST, "steps=4", "final_eval_tokens=2048"]
  line = _refused(capsys, ["--workdir", str(workdir), *argv])
  assert str(workdir) in line and "config.json" in line and "new --workdir" in line, line
  assert _files(workdir) == before


@pytest.mark.parametrize("argv", [[], ["--set", "steps=3"]])
def test_a_finished_run_without_its_checkpoints_is_refused_and_untouched(base_run, tmp_path, capsys, argv):
  """A finished run whose checkpoints are gone (a committed study's cell): training there again, with
  its own config or a longer one, would overwrite its metrics and evaluations, so it is refused."""
  workdir = _without_checkpoints(base_run, tmp_path)
  before = _files(workdir)
  line = _refused(capsys, ["--workdir", str(workdir), *argv])
  assert "eval.json, evals of a finished run but no checkpoint" in line and "new --workdir" in line, line
  assert _files(workdir) == before


def test_same_run_without_a_checkpoint_starts_again(base_run, tmp_path):
  """A run stopped before its first checkpoint (config.json and metrics, no checkpoint) is started
  again with its own config, as a sweep retrying a cell does."""
  workdir = _stale(base_run, tmp_path)
  assert main(["--workdir", str(workdir)]) == 0
  assert (workdir / "checkpoints" / "2").is_dir() and (workdir / "notes.txt").read_text() == "mine\n"


@pytest.mark.parametrize("contents, named", [
    ({"config.json": json.dumps({"name": "another tool", "epochs": 3})}, "not a fibjax config"),
    ({"metrics.jsonl": '{"step": 0}\n'}, "metrics.jsonl"),  # a run's outputs without its config
    ({"evals/x.json": "{}"}, "evals"),
])
def test_foreign_files_are_refused_and_untouched(tmp_path, capsys, contents, named):
  workdir = tmp_path / "w"
  for name, text in contents.items():
    (workdir / name).parent.mkdir(parents=True, exist_ok=True)
    (workdir / name).write_text(text)
  before = _files(workdir)
  line = _refused(capsys, ["--workdir", str(workdir), "--config", "tiny", "--set", *BASE])
  assert str(workdir) in line and named in line and "new --workdir" in line, line
  assert _files(workdir) == before


def test_a_source_tree_is_refused_as_a_workdir(tmp_path, capsys):
  """``--workdir .`` in a clone of the repository would scatter a run's files among the code."""
  workdir = tmp_path / "clone"
  (workdir / ".git").mkdir(parents=True)
  (workdir / "pyproject.toml").write_text("[project]\n")
  before = _files(workdir)
  line = _refused(capsys, ["--workdir", str(workdir), "--config", "tiny", "--set", *BASE])
  assert "source tree (it holds .git)" in line and "runs/NAME" in line, line
  assert _files(workdir) == before


def test_config_of_another_run_without_checkpoint_is_refused(base_run, tmp_path, capsys):
  workdir = tmp_path / "w"
  workdir.mkdir()
  other = apply_overrides(TrainConfig.load(base_run / "config.json"), ["seed=5"])
  other.save(workdir / "config.json")
  before = _files(workdir)
  line = _refused(capsys, ["--workdir", str(workdir), "--config", "tiny", "--set", *BASE])
  assert "seed: saved 5 vs requested 0" in line and "new --workdir" in line, line
  assert _files(workdir) == before


@pytest.mark.parametrize("stale", [False, True])
def test_second_trainer_is_refused_while_the_lock_is_held(base_run, tmp_path, capsys, stale):
  """A trainer holding the lock (with checkpoints, or before its first one) keeps the folder to itself."""
  workdir = _stale(base_run, tmp_path) if stale else pathlib.Path(shutil.copytree(base_run, tmp_path / "run"))
  with _held_lock(workdir):
    before = _files(workdir)
    line = _refused(capsys, ["--workdir", str(workdir), "--set", "steps=3"])
    assert line == (f"error: another process is training in {workdir}; wait for it or pick another --workdir"), line
    assert _files(workdir) == before


def test_read_only_tools_ignore_the_lock(base_run, tmp_path):
  workdir = pathlib.Path(shutil.copytree(base_run, tmp_path / "run"))
  with _held_lock(workdir):
    assert evaluate.main(["--workdir", str(workdir), "--lengths", "1", "--tokens", "256"]) == 0


@pytest.mark.parametrize("inside", ["workdir_in_data", "data_in_workdir", "same", "symlink"])
def test_workdir_and_data_overlapping_are_refused(tmp_path, capsys, inside):
  if inside == "workdir_in_data":
    data_dir, workdir = _corpus(tmp_path / "data"), tmp_path / "data" / "run"
  elif inside == "data_in_workdir":
    workdir = tmp_path / "w"
    data_dir = _corpus(workdir / "data")
  elif inside == "same":
    data_dir = workdir = _corpus(tmp_path / "data")
  else:  # a workdir reached through a link into the data folder
    data_dir = _corpus(tmp_path / "data")
    (tmp_path / "link").symlink_to(data_dir)
    workdir = tmp_path / "link" / "run"
  before = _files(tmp_path)
  line = _refused(capsys, ["--workdir", str(workdir), "--data", str(data_dir), "--set", *BASE])
  assert "keep them apart" in line and "inside" in line and str(data_dir.resolve()) in line, line
  assert _files(tmp_path) == before


@pytest.mark.parametrize("marker, named", [("__init__.py", "source tree (it holds Python files)"),
                                           ("sweep.json", "sweep root (it holds sweep.json)")])
def test_a_package_or_a_sweep_root_is_refused_as_a_workdir(tmp_path, capsys, marker, named):
  """``--workdir configs`` (a package) or ``--workdir results/small`` (a sweep root) would mix a
  run's files with the code or with the cells."""
  workdir = tmp_path / "folder"
  workdir.mkdir()
  (workdir / marker).write_text("{}\n")
  before = _files(workdir)
  line = _refused(capsys, ["--workdir", str(workdir), "--config", "tiny", "--set", *BASE])
  assert named in line and "runs/NAME" in line, line
  assert _files(workdir) == before


@pytest.mark.parametrize("where, named", [
    ("runs/a/checkpoints", "lies inside the run"),  # a folder of another run
    ("root/logs", "lies inside the sweep root"),  # a sweep root's folder that is not a cell
    ("root/dense-s0/evals", "lies inside the run"),
    ("runs", "holds runs or studies (a)"),  # the folder of runs
    (".", "holds runs or studies (root)"),  # a folder of studies, as results/ is
])
def test_a_folder_inside_a_run_or_a_study_or_holding_them_is_refused(base_run, tmp_path, capsys, where, named):
  """``--workdir runs/a/checkpoints``, ``results/starved/logs`` or ``results`` would mix a run's files with
  another run's or a study's; a sweep root's cell folder stays a workdir (the sweep trains there)."""
  shutil.copytree(base_run, tmp_path / "runs" / "a")
  (tmp_path / "root" / "logs").mkdir(parents=True)
  (tmp_path / "root" / "sweep.json").write_text("{}\n")
  shutil.copytree(base_run, tmp_path / "root" / "dense-s0")
  before = _files(tmp_path)
  line = _refused(capsys, ["--workdir", str(tmp_path / where), "--config", "tiny", "--set", *BASE])
  assert named in line and "a folder of its own" in line, line
  assert _files(tmp_path) == before


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_out_of_range_is_refused_before_anything_is_written(tmp_path, capsys, seed):
  line = _refused(capsys, ["--workdir", str(tmp_path / "w"), "--config", "tiny", "--set", *BASE, f"seed={seed}"])
  assert line == f"error: seed must be an int in [0, 2**32), got {seed}", line
  assert not (tmp_path / "w").exists()


def test_a_run_without_checkpoints_names_a_retrain_command_that_trains_it_again(base_run, tmp_path, monkeypatch):
  """A finished run whose checkpoints are gone cannot be probed; the command the refusal names
  (its config.json copied to a new workdir) trains the same config there; a sweep cell's names
  the root's recipe and overrides."""
  workdir = _without_checkpoints(base_run, tmp_path)
  with pytest.raises(ValueError, match="retrain it in a new workdir, ") as refused:
    load_run(workdir)
  command = str(refused.value).split("retrain it in a new workdir, ")[1]
  assert command == f"mkdir -p runs/stale && cp {workdir / 'config.json'} runs/stale/ && python -m train --workdir runs/stale"
  monkeypatch.chdir(tmp_path)
  (tmp_path / "runs" / "stale").mkdir(parents=True)
  shutil.copy(workdir / "config.json", tmp_path / "runs" / "stale")
  assert main(["--workdir", "runs/stale"]) == 0
  assert TrainConfig.load(tmp_path / "runs" / "stale" / "config.json") == TrainConfig.load(workdir / "config.json")
  assert (tmp_path / "runs" / "stale" / "checkpoints" / "2").is_dir()
  cell = tmp_path / "root" / "fib-linear-s0"
  shutil.copytree(workdir, cell)
  (cell.parent / "sweep.json").write_text(json.dumps({"config": "tiny", "overrides": ["steps=2", "progress=false"]}))
  assert retrain_command(cell, TrainConfig.load(cell / "config.json")) == (
      "python -m train --config tiny --variant fib-linear --workdir runs/fib-linear-s0 --set seed=0 steps=2")
