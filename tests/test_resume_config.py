"""Resuming a run checks the requested config against the saved one: a field that shapes the
training (seed, lr, the recipe's model, ...) is refused in one line with the workdir untouched;
the fields of ``train.run.workdir.RESUMABLE_FIELDS`` may change, each change recorded in
``config_history.jsonl``. In-process runs of ``python -m train``'s ``main`` (seed 0, 2 steps)."""

import dataclasses
import json
import pathlib
import shutil

import pytest

from configs.base import TrainConfig
from tests.test_train import FAST, _losses
from train.run import rundir
from train.run.workdir import RESUMABLE_FIELDS
from train.__main__ import main

QUICK = "final_eval_multiples=1"  # one final evaluation length: less to compile
BASE = [*FAST, "steps=2", "checkpoint_every=1", "log_every=1", "eval_every=100", QUICK]  # seed 0 (the default)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> pathlib.Path:
  """A finished 2-step tiny run (seed 0) with checkpoints 1 and 2; tests copy it."""
  workdir = tmp_path_factory.mktemp("base") / "run"
  assert main(["--workdir", str(workdir), "--set", *BASE]) == 0
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
  return workdir


def _copy(base_run: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(base_run, tmp_path / "run"))


def _files(workdir: pathlib.Path) -> dict[str, tuple[bytes, int]]:
  """Every file's bytes and modification time, by path inside ``workdir``."""
  return {str(p.relative_to(workdir)): (p.read_bytes(), p.stat().st_mtime_ns)
          for p in workdir.rglob("*") if p.is_file()}


def _refused(capsys, argv: list[str]) -> str:
  """The one ``error:`` line of a run refused with exit status 2."""
  capsys.readouterr()
  assert main(argv) == 2
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


def _history(workdir: pathlib.Path) -> list[dict]:
  path = workdir / rundir.CONFIG_HISTORY
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_resumable_fields_are_config_fields():
  names = {f.name for f in dataclasses.fields(TrainConfig)} | {f"model.{f.name}" for f in
                                                               dataclasses.fields(TrainConfig().model)}
  assert set(RESUMABLE_FIELDS) <= names
  for shaping in ("seed", "lr", "warmup_steps", "batch_size", "model.seq_len", "model.dtype", "model.param_dtype",
                  "tokenizer", "pack_documents", "model.variant"):
    assert shaping not in RESUMABLE_FIELDS


@pytest.mark.parametrize("overrides, named", [
    (["seed=7"], ["seed: saved 0 vs requested 7"]),
    (["lr=1e-3"], ["lr: saved 0.003 vs requested 0.001"]),
    (["seed=7", "batch_size=8", "steps=4"], ["seed: saved 0 vs requested 7", "batch_size: saved 16 vs requested 8"]),
])
def test_changed_training_field_is_refused_and_run_untouched(base_run, tmp_path, capsys, overrides, named):
  workdir = _copy(base_run, tmp_path)
  before = _files(workdir)
  line = _refused(capsys, ["--workdir", str(workdir), "--set", *overrides])
  assert "incompatible" in line and all(n in line for n in named), line
  assert "steps" not in line.split("(")[1].split(")")[0]  # steps may change: not named as a difference
  assert f"python -m train --workdir {workdir} alone" in line and "new --workdir" in line
  assert _files(workdir) == before  # config.json and checkpoints byte-identical, nothing added


def test_other_recipe_is_refused_and_the_same_recipe_resumes(base_run, tmp_path, capsys):
  workdir = _copy(base_run, tmp_path)
  before = _files(workdir)
  line = _refused(capsys, ["--workdir", str(workdir), "--config", "small"])
  assert "incompatible" in line and "model.d_model" in line and "batch_size" in line, line
  line = _refused(capsys, ["--workdir", str(workdir), "--config", "tiny", "--set", *FAST, "seed=1"])
  assert "seed: saved 0 vs requested 1" in line
  assert _files(workdir) == before
  # the recipe it was trained with: resumes with the run's steps and intervals (the recipe's own
  # steps=300, eval_every=100 ... are not requested), so config.json is unchanged
  assert main(["--workdir", str(workdir), "--config", "tiny", "--set", *FAST]) == 0
  assert (workdir / "config.json").read_bytes() == before["config.json"][0]
  assert not (workdir / rundir.CONFIG_HISTORY).exists()


def test_more_steps_resume_and_are_recorded_then_a_plain_resume_records_nothing(base_run, tmp_path):
  workdir = _copy(base_run, tmp_path)
  assert main(["--workdir", str(workdir), "--set", "steps=4"]) == 0
  assert sorted(_losses(workdir)) == [1, 2, 3, 4]
  assert TrainConfig.load(workdir / "config.json").steps == 4
  history = _history(workdir)
  assert len(history) == 1 and history[0]["step"] == 2
  assert history[0]["changed"] == {"steps": {"old": 2, "new": 4}}
  config = (workdir / "config.json").read_bytes()
  assert main(["--workdir", str(workdir)]) == 0  # plain resume of the finished run: no change, no record
  assert _history(workdir) == history and (workdir / "config.json").read_bytes() == config


def test_intervals_may_change_and_steps_may_not_end_before_the_checkpoint(base_run, tmp_path, capsys):
  workdir = _copy(base_run, tmp_path)
  line = _refused(capsys, ["--workdir", str(workdir), "--set", "steps=1"])
  assert "checkpoint at step 2" in line and "steps=1" in line
  assert main(["--workdir", str(workdir), "--set", "eval_every=1", "checkpoint_every=2", "progress=false"]) == 0
  saved = TrainConfig.load(workdir / "config.json")
  assert (saved.eval_every, saved.checkpoint_every, saved.seed) == (1, 2, 0)
  (record,) = _history(workdir)
  assert record["step"] == 2
  assert record["changed"] == {"eval_every": {"old": 100, "new": 1}, "checkpoint_every": {"old": 1, "new": 2}}


def test_allow_change_resumes_with_a_training_field_changed_on_purpose(base_run, tmp_path, capsys):
  """``--allow-change lr`` (e.g. a lower lr after a divergence) resumes with it and records it;
  the refusal names the flag; model fields and unknown names are refused."""
  workdir = _copy(base_run, tmp_path)
  line = _refused(capsys, ["--workdir", str(workdir), "--set", "lr=1e-3"])
  assert "--allow-change lr to change them on purpose" in line
  line = _refused(capsys, ["--workdir", str(workdir), "--set", "model.window=4"])
  assert "allow-change" not in line  # a model field is never changeable
  for name, message in (("model.window", "never change"), ("lrr", "no such training field")):
    assert message in _refused(capsys, ["--workdir", str(workdir), "--allow-change", name])
  assert main(["--workdir", str(workdir), "--allow-change", "lr", "--set", "lr=1e-3", "steps=3"]) == 0
  assert TrainConfig.load(workdir / "config.json").lr == 1e-3 and sorted(_losses(workdir)) == [1, 2, 3]
  (record,) = _history(workdir)
  assert record["step"] == 2 and record["changed"] == {"lr": {"old": 0.003, "new": 0.001}, "steps": {"old": 2, "new": 3}}
