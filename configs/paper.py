"""``paper``: SPEC section 1 — hidden 512, 16 layers, 8 heads of 64, ~57.8M parameters, T = 1024.

426M training tokens: 26,000 steps of 16 x 1024 tokens.
"""

from fibjax.model import ModelConfig
from configs.base import TrainConfig


def get_config() -> TrainConfig:
  model = ModelConfig(variant="fib-linear", seq_len=1024, window=64, dtype="bfloat16")
  return TrainConfig(model=model, batch_size=16, steps=26_000, lr=1e-3, warmup_steps=1000, eval_every=1000,
                     checkpoint_every=1000, final_eval_tokens=1_048_576)
