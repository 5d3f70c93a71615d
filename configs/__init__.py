"""Named recipes: ``tiny`` (CPU, minutes), ``small`` (the reduced sweep recipe), ``paper`` (SPEC 1),
``recall``/``recall8``/``recall128``/``recall128-long`` (associative recall: 2 and 8 layers, and 2 at CPU size,
briefly and long enough for dense to pass the validity bar), ``starved`` (a window that cannot span T)."""

from __future__ import annotations

import dataclasses

from configs import paper, recall, small, starved, tiny
from configs.base import TrainConfig

CONFIGS = {"tiny": tiny.get_config, "small": small.get_config, "paper": paper.get_config,
           "recall": recall.get_config, "recall8": recall.get_config_deep,
           "recall128": recall.get_config_cpu, "recall128-long": recall.get_config_cpu_long,
           "starved": starved.get_config}


def get_config(name: str, variant: str | None = None) -> TrainConfig:
  """The named recipe, with ``variant`` (any of ``fibjax.VARIANTS``) swapped in if given."""
  if name not in CONFIGS:
    raise ValueError(f"unknown config {name!r}; choose one of {sorted(CONFIGS)}")
  cfg = CONFIGS[name]()
  if variant is not None:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, variant=variant))
  return cfg
