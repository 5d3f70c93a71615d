"""``recall`` and ``recall8``: multi-query associative recall (``task=mqar``) at T = 512, W = 32.

``recall``: 2 layers, hidden 128, 4 heads of 32. Through two layers the window alone reaches
2 x (W - 1) = 62 tokens; a pair stored further back is recalled only through the offsets, so
accuracy by distance reads each pattern's one-hop reach beyond the window. ``recall8``: the
``small`` model (8 layers, hidden 256) on the same task; its window reaches 8 x 31 = 248 of T.
Every row is a task sequence (the byte-level key vocabulary holds 4096 six-letter words, values
are 4 digits, 8 queries per sequence, distances uniform over all the length allows: 104..408 at
T); only answer tokens are scored. 3000 steps of 64 x 512 tokens. Why 8 queries and 3000 steps:
NOTES.md, "Experiments that can tell the patterns apart".
"""

import dataclasses

from configs import small
from configs.base import TrainConfig
from fibjax.model import ModelConfig


def get_config() -> TrainConfig:
  model = ModelConfig(variant="fib-linear", d_model=128, num_layers=2, num_heads=4, head_dim=32, mlp_dim=384,
                      seq_len=512, window=32, dtype="bfloat16")
  return TrainConfig(model=model, task="mqar", task_mix=1.0, task_queries=8, batch_size=64, steps=3000, lr=3e-3,
                     warmup_steps=200, eval_every=1000, checkpoint_every=1000, final_eval_tokens=32768)


def get_config_deep() -> TrainConfig:
  return dataclasses.replace(get_config(), model=small.get_config().model)
