"""``recall``, ``recall8`` and ``recall128``: multi-query associative recall (``task=mqar``).

``recall``: 2 layers, hidden 128, 4 heads of 32. Through two layers the window alone reaches
2 x (W - 1) = 62 tokens; a pair stored further back is recalled only through the offsets, so
accuracy by distance reads each pattern's one-hop reach beyond the window. ``recall8``: the
``small`` model (8 layers, hidden 256) on the same task; its window reaches 8 x 31 = 248 of T.
Every row is a task sequence (the byte-level key vocabulary holds 4096 six-letter words, values
are 4 digits, 8 queries per sequence, distances uniform over all the length allows: 104..408 at
T); only answer tokens are scored. 3000 steps of 64 x 512 tokens. Why 8 queries and 3000 steps:
NOTES.md, "Experiments that can tell the patterns apart".

``recall128``: the 2-layer study at a size a CPU trains in minutes (T = 128, W = 8, hidden 64, 2
heads of 32, 2 queries a sequence, 1200 steps of 32 x 128 tokens, float32), its distances a grid
(``GRID128``) with one distance for each set of patterns that reach it through the two layers
(``train.probe.reach``; +-1 token around it reached alike): 27 fib-fixed and fib-linear, 52
fib-linear only, 65 pow2 only, 70 fib-linear and pow2, 92 fib-fixed only, 100 none. So accuracy at
each distance reads against each pattern's predicted reach.

``recall128-long``: ``recall128`` at learning rate 1e-3 for 12000 steps (10x the answers), the
recipe where dense passes the study's validity bar (recall >= 0.90 at T; 1200 steps at 3e-3 leave
it at 0.56-0.80 over 5 seeds). Why: NOTES.md, the dense pilots of ``recall128``.
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


GRID128 = (27, 52, 65, 70, 92, 100)


def get_config_cpu() -> TrainConfig:
  model = ModelConfig(variant="fib-linear", d_model=64, num_layers=2, num_heads=2, head_dim=32, mlp_dim=192,
                      seq_len=128, window=8, dtype="float32")
  return TrainConfig(model=model, task="mqar", task_mix=1.0, task_queries=2,
                     task_distance="grid:" + ",".join(map(str, GRID128)), batch_size=32, steps=1200, lr=3e-3,
                     warmup_steps=50, eval_every=1200, checkpoint_every=600, final_eval_tokens=8192)


def get_config_cpu_long() -> TrainConfig:
  return dataclasses.replace(get_config_cpu(), lr=1e-3, steps=12000, eval_every=12000, checkpoint_every=3000)
