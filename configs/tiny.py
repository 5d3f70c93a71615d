"""``tiny``: trains on a 2-core CPU in a few minutes; the README's main job."""

from fibjax.model import ModelConfig
from configs.base import TrainConfig


def get_config() -> TrainConfig:
  model = ModelConfig(variant="fib-linear", d_model=128, num_layers=4, num_heads=4, head_dim=32, mlp_dim=384,
                      seq_len=128, window=16, alpha_min=0.5, alpha_max=2.0)
  return TrainConfig(model=model, batch_size=16, steps=300, lr=3e-3, warmup_steps=30, log_every=10, eval_every=100,
                     checkpoint_every=100, final_eval_tokens=16384)
