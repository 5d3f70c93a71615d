"""``small``: the sweep recipe (SPEC section 2: 7 variants x 3 seeds), sized to the embedded corpus.

Hidden 256, 8 layers, 4 heads of 64, T = 512, W = 32, bf16 compute with fp32 master weights.
2000 steps of 64 x 512 tokens = 65.5M training tokens, 3.1 passes over the corpus's 21.0M
training tokens: at most 4 repeats, where repeated data costs little against fresh data
(Muennighoff et al. 2023), so the comparison measures modelling, not memorisation. Every run
prints and saves its own count (``data_budget.json``).
"""

from configs.base import TrainConfig
from fibjax.model import ModelConfig


def get_config() -> TrainConfig:
  model = ModelConfig(variant="fib-linear", d_model=256, num_layers=8, num_heads=4, head_dim=64, mlp_dim=832,
                      seq_len=512, window=32, dtype="bfloat16")
  return TrainConfig(model=model, batch_size=64, steps=2000, lr=2e-3, warmup_steps=200, eval_every=500,
                     checkpoint_every=500, final_eval_tokens=262144)
