"""Where a learned pattern's alphas ended: each layer's trained alpha and its distances.

Written by ``train.study.experiment.probe_cell`` for every run of a learned pattern, so a study can
say whether learned alpha moved from ``alpha_0`` (and where its offsets went) without the
checkpoint. Writes ``RUN/alpha/step<N>.json``.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
from flax import nnx

from train.run import rundir
from train.run.evaluation import read_or_write
from train.run.restore import Run


def learned_alphas(run: Run) -> dict[str, Any]:
  """``{"step", "alpha_0", "alpha": [per layer], "distances": [per layer, the terms' distances]}`` of
  ``run``; raises ``ValueError`` for a run whose layers are not learned patterns."""
  model = nnx.merge(run.graphdef, run.params)
  patterns = [block.attn.pattern for block in model.blocks]
  if any(p.kind != "learned" for p in patterns):
    raise ValueError(f"{run.workdir} trains variant {run.cfg.model.variant}, whose offsets are not learned: "
                     "only a learned pattern has alphas to read")
  return {"step": run.step, "alpha_0": [p.alpha_0 for p in patterns],
          "alpha": [float(block.attn.alpha()) for block in model.blocks],
          "distances": [np.asarray(block.attn.offsets(), np.float64).round(4).tolist() for block in model.blocks]}


def run_alpha(run: Run) -> tuple[pathlib.Path, dict]:
  """Writes (or reads, if already written) ``learned_alphas(run)``."""
  return read_or_write(run.workdir / rundir.ALPHA / f"step{run.step}.json", lambda: learned_alphas(run))
