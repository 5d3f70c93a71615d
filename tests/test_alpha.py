"""``train.probe.alpha``: a learned run's trained alphas and distances, read from its checkpoint
(written once, read back after), refused for a static pattern; and the report's section of them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flax import nnx

import configs
from configs.base import apply_overrides
from train.probe import alpha
from train.run.restore import load_run
from train.run.trainer import train
from train.study import report
from tests.test_recall import TINY


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
  """A 3-step fib-learned tiny run at a learning rate that moves alpha."""
  workdir = tmp_path_factory.mktemp("alpha") / "run"
  cfg = apply_overrides(configs.get_config("tiny", "fib-learned"), [*TINY, "steps=3", "lr=0.05", "warmup_steps=0"])
  train(cfg.validate(), workdir)
  return workdir


def test_alphas_are_the_checkpoints_and_written_once(learned_run):
  run = load_run(learned_run)
  path, record = alpha.run_alpha(run)
  model = nnx.merge(run.graphdef, run.params)
  want = [math.exp(float(b.attn.log_alpha[...])) for b in model.blocks]
  assert path == learned_run / "alpha" / f"step{run.step}.json" and json.loads(path.read_text()) == record
  np.testing.assert_allclose(record["alpha"], want, rtol=1e-6)
  assert record["alpha_0"] == [b.attn.pattern.alpha_0 for b in model.blocks]
  assert any(abs(a - a0) > 1e-4 for a, a0 in zip(record["alpha"], record["alpha_0"]))  # training moved it
  for a, dist, block in zip(record["alpha"], record["distances"], model.blocks):
    np.testing.assert_allclose(dist, a * np.asarray(block.attn.pattern.terms), rtol=1e-4)
  path.write_text(json.dumps({**record, "alpha": [0.0]}))  # written once: the file is read, not recomputed
  assert alpha.run_alpha(run)[1]["alpha"] == [0.0]


def test_a_static_pattern_has_no_alphas(tmp_path):
  workdir = tmp_path / "run"
  train(apply_overrides(configs.get_config("tiny", "fib-linear"), [*TINY, "steps=1"]).validate(), workdir)
  with pytest.raises(ValueError, match="whose offsets are not learned"):
    alpha.run_alpha(load_run(workdir))
  assert not (workdir / "alpha").exists()


def test_report_section_states_alpha_per_layer():
  runs = {"fib-learned": {s: {"alpha": {"alpha_0": [1.0, 1.0], "alpha": [1.0 + 0.1 * s, 0.5]}} for s in (0, 1)},
          "fib-linear": {0: {}}}
  lines = report.alpha_section(runs)
  assert "| fib-learned | 0 | 2 | 1.000 | 1.050 +- 0.071 | 5.0% |" in lines
  assert "| fib-learned | 1 | 2 | 1.000 | 0.500 +- 0.000 | 50.0% |" in lines
  assert report.alpha_section({"fib-linear": {0: {}}}) == []


def test_a_learned_cell_is_probed_for_its_alphas(learned_run):
  from train.study.experiment import probe_cell  # noqa: PLC0415

  run = load_run(learned_run)
  files = probe_cell(run)
  assert set(files) == {"eval", "recall", "alpha"}  # a run trained on a task alone
  assert json.loads(files["alpha"].read_text())["step"] == run.step
