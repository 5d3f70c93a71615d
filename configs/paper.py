"""``paper``: SPEC section 1 — hidden 512, 16 layers, 8 heads of 64, ~57.8M parameters, T = 1024.

426M training tokens: 26,000 steps of 16 x 1024 tokens. That is 20 passes over the embedded
corpus (21.0M training tokens); at most 4 passes needs a corpus of at least ~107M training tokens
(~110 MB of text at byte level), given with ``--data``. On the embedded corpus, shorten it:
``--set steps=2400`` trains 39.3M tokens, 1.9 passes (``results/paper``).
"""

from fibjax.model import ModelConfig
from configs.base import TrainConfig


def get_config() -> TrainConfig:
  model = ModelConfig(variant="fib-linear", seq_len=1024, window=64, dtype="bfloat16")
  return TrainConfig(model=model, batch_size=16, steps=26_000, lr=1e-3, warmup_steps=1000, eval_every=1000,
                     checkpoint_every=1000, final_eval_tokens=1_048_576)
