"""``python -m train.generate`` end to end: a trained run's checkpoint continues a prompt."""

import subprocess
import sys

import pytest

from tests.compile_cache import cached_env
from tests.test_train import ROOT


def _generate(*args):
  """``python -m train.probe.generate ARGS``, sharing compiled programs with the other runs
  (``tests.compile_cache``)."""
  return subprocess.run([sys.executable, "-m", "train.probe.generate", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env=cached_env())


@pytest.fixture
def run_dir(base_run):
  """A trained run to generate from (tests/conftest.py's ``base_run``: 8 steps, checkpoints 4 and
  8); read only."""
  return base_run


def test_generate_streams_a_continuation(run_dir):
  res = _generate("--workdir", str(run_dir), "--prompt", "Fellow-Citizens", "--max-new-tokens", "40",
                  "--temperature", "0")
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.startswith("Fellow-Citizens") and len(res.stdout) > len("Fellow-Citizens")
  again = _generate("--workdir", str(run_dir), "--prompt", "Fellow-Citizens", "--max-new-tokens", "40",
                    "--temperature", "0")
  assert again.stdout == res.stdout  # greedy decoding of a restored checkpoint is deterministic


@pytest.mark.parametrize(
    "setup, args, message",
    [
        ("missing", ["--prompt", "hi"], "does not exist"),
        ("run", ["--prompt", ""], "prompt is empty"),
        ("garbage", ["--prompt", "hi"], "not a fibjax config"),
        ("no_checkpoint", ["--prompt", "hi"], "no checkpoint"),
    ],
)
def test_generate_errors(tmp_path, run_dir, setup, args, message):
  workdir = {"missing": tmp_path / "nope", "run": run_dir}.get(setup, tmp_path / setup)
  if setup == "garbage":
    workdir.mkdir()
    (workdir / "config.json").write_text('{"model": {"nonsense": 1}}')
  if setup == "no_checkpoint":
    workdir.mkdir()
    (workdir / "config.json").write_text((run_dir / "config.json").read_text())
  res = _generate("--workdir", str(workdir), *args)
  assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
