"""``starved``: the ``small`` model with a window too narrow to span T through its layers.

Hidden 256, 8 layers, 4 heads of 64, T = 512, W = 16: the window alone reaches
L x (W - 1) = 8 x 15 = 120 <= T / 4 = 128 tokens, so whatever a model uses of the context beyond
that comes through its offsets (or, for ``dense``, its full attention). Offsets scale with the
window as in ``small`` (alpha 0.5..2.0 for ``linear``). 800 steps of 64 x 512 tokens = 26.2M
training tokens, 1.25 passes over the embedded corpus's 21.0M.
"""

import dataclasses

from configs import small
from configs.base import TrainConfig


def get_config() -> TrainConfig:
  cfg = small.get_config()
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, window=16), steps=800, warmup_steps=80,
                             eval_every=400, checkpoint_every=400)
