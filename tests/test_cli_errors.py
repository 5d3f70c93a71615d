"""The read-only tools (evaluate, generate, passkey) and the sweep as a user meets them when things
go wrong: damaged checkpoints are skipped, never moved; bad arguments are one ``error:`` line."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.base import TrainConfig, apply_overrides
from tests.compile_cache import cached_env
from tests.test_reliability import BASE, _error_line, _truncate_every_array_file
from tests.test_train import ROOT, _cfg
from train.data import text as data
from train.study import experiment
from train.probe import generate
from train.run.restore import Run, abstract_params, restore_params

TOOLS = {  # the cheapest call of each read-only tool on the tiny run (T = 64; a passkey sample needs > 81)
    "train.probe.evaluate": ["--lengths", "1"],
    "train.probe.generate": ["--prompt", "The", "--max-new-tokens", "4", "--temperature", "0"],
    "train.probe.passkey": ["--lengths", "2", "--depths", "0.5", "--trials", "1"],
}


def _tool(module: str, workdir: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
  """``python -m MODULE --workdir WORKDIR ARGS``, sharing compiled programs with the other runs
  (``tests.compile_cache``)."""
  return subprocess.run([sys.executable, "-m", module, "--workdir", str(workdir), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env=cached_env())


def _snapshot(workdir: pathlib.Path) -> dict:
  """Every file and folder of the run's checkpoints, with size and modification time."""
  return {p.relative_to(workdir): (p.stat().st_size, p.stat().st_mtime_ns) for p in (workdir / "checkpoints").rglob("*")}


@pytest.fixture
def damaged_run(base_run, tmp_path) -> pathlib.Path:
  """A copy of ``base_run`` (tests/conftest.py: a finished run of ``BASE``, checkpoints 4 and 8)
  whose latest checkpoint (8) has truncated array files."""
  workdir = tmp_path / "run"
  shutil.copytree(base_run, workdir)
  _truncate_every_array_file(workdir / "checkpoints" / "8")
  return workdir


def test_read_only_tools_skip_a_damaged_checkpoint_and_move_nothing(damaged_run):
  before = _snapshot(damaged_run)
  for module, args in TOOLS.items():
    res = _tool(module, damaged_run, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr[-3000:]  # the warning alone: no traceback, no library noise
    assert lines[0].startswith("warning: checkpoint step 8 in ") and "is damaged (" in lines[0]
    assert "cannot be read" in lines[0], lines[0]
    assert "skipped it for step 4" in lines[0], lines[0]
  assert (damaged_run / "evals" / "step4_heldout_x1_t512.json").exists()
  assert list((damaged_run / "passkey").glob("step4_*.json"))
  again = _tool("train.probe.evaluate", damaged_run, *TOOLS["train.probe.evaluate"])
  assert again.returncode == 0 and again.stdout.rstrip().endswith("(written earlier; nothing recomputed)")
  assert f"reused {damaged_run / 'evals' / 'step4_heldout_x1_t512.json'}" in again.stdout
  assert _snapshot(damaged_run) == before and not (damaged_run / "damaged_checkpoints").exists()


def test_no_intact_checkpoint_is_one_error_line_and_moves_nothing(damaged_run):
  (damaged_run / "checkpoints" / "4" / "state" / "_METADATA").unlink()
  before = _snapshot(damaged_run)
  for module, args in TOOLS.items():
    line = _error_line(_tool(module, damaged_run, *args))
    assert "no intact checkpoint" in line and "step 8: " in line and "cannot be read" in line, line
    assert "step 4: state/_METADATA missing" in line, line
  assert _snapshot(damaged_run) == before and not (damaged_run / "damaged_checkpoints").exists()
  assert not (damaged_run / "passkey").exists() and sorted(p.name for p in (damaged_run / "evals").iterdir()) == [
      "step8_heldout_x1_t512.json"]  # the one training wrote


def test_checkpoint_of_another_config_is_one_error_line(base_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(base_run, workdir)
  cfg = TrainConfig.load(workdir / "config.json")
  (workdir / "config.json").unlink()
  apply_overrides(cfg, ["model.mlp_dim=128"]).save(workdir / "config.json")
  line = _error_line(_tool("train.probe.evaluate", workdir, "--lengths", "1"))
  assert "checkpoint step 8" in line and "does not match the run's config.json" in line, line
  assert "mlp" in line and "checkpoint (64, 32) vs config (128, 32)" in line, line


def test_generate_top_k_beyond_the_vocabulary_is_one_error_line(base_run):
  line = _error_line(_tool("train.probe.generate", base_run, "--prompt", "The", "--top-k", "100000"))
  assert "--top-k must be <= the vocabulary size 256" in line, line


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "--temperature must be a number >= 0"),
    (["--temperature", "nan"], "--temperature must be a number >= 0"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be within [1, 2**30]"),
    (["--seed", str(2**32)], "--seed must be within [0, 2**32)"),
])
def test_generate_refuses_bad_sampling_arguments_before_loading(tmp_path, capsys, args, message):
  assert generate.main(["--workdir", str(tmp_path), "--prompt", "The", *args]) == 2  # tmp_path: no run to load
  err = capsys.readouterr().err
  assert err.splitlines() == [err.strip()] and err.startswith(f"error: {message}"), err


def test_generate_reports_an_error_raised_while_streaming_in_one_line(base_run, monkeypatch, capsys):
  """The real ``fibjax.generate.stream`` refusing its arguments mid-command (as it did for
  ``--temperature -1`` before the CLI checked it): one line on stderr, the cut-off text ended."""
  cfg = TrainConfig.load(base_run / "config.json")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  graphdef, target = abstract_params(cfg, mesh)
  run = Run(base_run, cfg, mesh, graphdef, restore_params(base_run / "checkpoints", 8, target), 8,
            data.ByteTokenizer())
  real_stream = generate.stream
  monkeypatch.setattr("train.run.restore.load_run", lambda workdir: run)
  monkeypatch.setattr(generate, "stream", lambda *a, **kw: real_stream(*a, **{**kw, "temperature": -1.0}))
  assert generate.main(["--workdir", str(base_run), "--prompt", "The", "--max-new-tokens", "4"]) == 2
  out, err = capsys.readouterr()
  assert out == "The\n"
  assert err.splitlines() == [err.strip()] and err.startswith("error: temperature must be >= 0"), err


def test_unknown_budget_is_refused_before_any_cell_trains(tmp_path):
  cmd = [sys.executable, "-m", "train.study.sweep", "--root", str(tmp_path / "root"), "--config", "tiny", "--variants",
         "fib-linear", "--seeds", "0", "--budgets", "full", "bogus", "--set", *BASE]
  line = _error_line(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120))
  assert "unknown --budgets ['bogus']" in line and "far-0.5" in line, line
  assert not (tmp_path / "root").exists()
  with pytest.raises(ValueError, match=r"unknown --budgets \['nope'\]"):
    experiment.run_cell(tmp_path / "cell", "tiny", "fib-linear", 0, BASE, ("full", "nope"))
  assert not (tmp_path / "cell").exists()


def test_bad_tuple_override_names_the_field_and_the_form():
  with pytest.raises(ValueError, match=r"final_eval_multiples='1,x': expected comma-separated integers, e\.g\. "
                                       r"final_eval_multiples=1,2,4"):
    apply_overrides(_cfg(), ["final_eval_multiples=1,x"])
  assert apply_overrides(_cfg(), ["final_eval_multiples=1, 2,"]).final_eval_multiples == (1, 2)


def test_latency_refuses_a_root_mixing_recipes(tmp_path):
  """train.study.latency times one run per variant; runs of two recipes under one root are refused in one
  line rather than compared."""
  import configs  # noqa: PLC0415
  from train.study import latency  # noqa: PLC0415

  for name, config, variant in (("a", "tiny", "dense"), ("b", "small", "fib-linear")):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(configs.get_config(config, variant).to_dict()))
    (tmp_path / name / "eval.json").write_text("{}")
  with pytest.raises(ValueError, match=r"more than one recipe \(a and b differ in batch_size, "):
    latency.first_run_per_variant(tmp_path)
  res = subprocess.run([sys.executable, "-m", "train.study.latency", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert "give one sweep's root" in _error_line(res)
  (tmp_path / "b" / "config.json").write_text(json.dumps(configs.get_config("tiny", "fib-linear").to_dict()))
  assert list(latency.first_run_per_variant(tmp_path)) == ["dense", "fib-linear"]  # one recipe: accepted
  assert latency.no_runs_message(tmp_path / "a" / "evals").endswith("after python -m train.sweep has finished its cells")
