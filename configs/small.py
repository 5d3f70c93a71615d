"""``small``: the reduced recipe the 7-variant x 3-seed sweep uses on one GPU each.

Hidden 256, 8 layers, 4 heads of 64, T = 512, W = 32, bf16 compute with fp32 master weights.
"""

from fibjax.model import ModelConfig
from configs.base import TrainConfig


def get_config() -> TrainConfig:
  model = ModelConfig(variant="fib-linear", d_model=256, num_layers=8, num_heads=4, head_dim=64, mlp_dim=832,
                      seq_len=512, window=32, dtype="bfloat16")
  return TrainConfig(model=model, batch_size=64, steps=4000, lr=2e-3, warmup_steps=200, eval_every=500,
                     checkpoint_every=500, final_eval_tokens=262144)
