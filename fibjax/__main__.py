"""``python -m fibjax``: print each variant's layer alphas, offsets and parameter count at the paper's
model size, for a sequence length and window given by --seq-len and --window."""

import sys

from fibjax.cli import ArgumentParser
from fibjax.model import RANDOM, VARIANTS, ModelConfig, NoOffsets, abstract_param_count, layer_patterns


def check_args(seq_len: int, window: int) -> None:
  """Raises ``ValueError`` naming the bad flag and what it accepts: the sparse variants need
  ``1 <= --window < --seq-len`` (their offsets lie between the window and the reach, T)."""
  if seq_len < 2:
    raise ValueError(f"--seq-len must be an int >= 2, got {seq_len}")
  if window < 1:
    raise ValueError(f"--window must be an int >= 1, got {window}")
  if window >= seq_len:
    raise ValueError(f"--window must be below --seq-len ({seq_len}), got {window}; "
                     f"give a smaller --window or a larger --seq-len")


def report(seq_len: int, window: int) -> list[str]:
  """The lines to print: every variant's parameter count and its first layers' alphas and offsets."""
  lines = []
  for variant in VARIANTS:
    cfg = ModelConfig(variant=variant, seq_len=seq_len, window=window)
    try:
      pats = layer_patterns(cfg)
    except NoOffsets:
      lines.append(f"{variant:13s} no offset in [window, reach) at this window: the window alone (variant window)")
      continue
    lines.append(f"{variant:13s} params={abstract_param_count(cfg):,}")
    if variant == "window":
      lines.append(f"    every layer: the window of {window} keys, no offsets")
    elif cfg.schedule == RANDOM:
      lines += [f"    layer {layer}: {len(p.offsets)} offsets (as linear), seed {cfg.offset_seed}: {p.offsets}"
                for layer, p in enumerate(pats[:3])]
    elif variant != "dense":
      lines += [f"    layer {layer}: alpha={p.alpha_0:.3f} offsets={p.offsets or p.terms}"
                for layer, p in enumerate(pats[:3])]
  return lines


def main() -> int:
  parser = ArgumentParser(description=__doc__)
  parser.add_argument("--seq-len", type=int, default=ModelConfig.seq_len)
  parser.add_argument("--window", type=int, default=ModelConfig.window)
  args = parser.parse_args()
  try:  # every line is built before any is printed, so a failure prints only its error
    check_args(args.seq_len, args.window)
    lines = report(args.seq_len, args.window)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
