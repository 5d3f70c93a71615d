"""``python -m fibjax``: print each variant's layer alphas, offsets and parameter count for a recipe."""

import argparse

from fibjax.model import VARIANTS, ModelConfig, abstract_param_count, layer_patterns


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--seq-len", type=int, default=ModelConfig.seq_len)
  parser.add_argument("--window", type=int, default=ModelConfig.window)
  args = parser.parse_args()
  for variant in VARIANTS:
    cfg = ModelConfig(variant=variant, seq_len=args.seq_len, window=args.window)
    pats = layer_patterns(cfg)
    print(f"{variant:13s} params={abstract_param_count(cfg):,}")
    if variant != "dense":
      for layer, p in enumerate(pats[:3]):
        print(f"    layer {layer}: alpha={p.alpha_0:.3f} offsets={p.offsets or p.terms}")


if __name__ == "__main__":
  main()
