"""``python -m train.generate --workdir RUN --prompt "..."``: continue a prompt with a trained run.

Restores the latest Orbax checkpoint of ``RUN`` and streams the continuation to stdout as tokens
come (bounded KV cache for sparse variants; see ``fibjax.generate``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax.numpy as jnp
from flax import nnx

from fibjax.generate import stream


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__)
  parser.add_argument("--workdir", required=True, type=pathlib.Path)
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--max-new-tokens", type=int, default=200)
  parser.add_argument("--temperature", type=float, default=0.8)
  parser.add_argument("--top-k", type=int, default=40)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    if not args.prompt:
      raise ValueError("the prompt is empty: give some text to continue, e.g. --prompt 'Fellow-Citizens'")
    if not args.workdir.is_dir():
      raise ValueError(f"workdir {args.workdir} does not exist: train one first with python -m train --workdir ...")
    if args.max_new_tokens < 1:
      raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    from train.restore import load_run  # noqa: PLC0415  (heavy: after the argument checks)

    run = load_run(args.workdir)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  model = nnx.merge(run.graphdef, run.params)
  prompt = run.tokenizer.encode(args.prompt)
  if run.cfg.tokenizer == "byte":
    prompt = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.asarray(prompt)])  # documents start with 0
  print(args.prompt, end="", flush=True)
  ids: list[int] = []
  shown = ""
  for token in stream(model, jnp.asarray(prompt, jnp.int32)[None], args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, seed=args.seed):
    ids.append(int(token[0]))
    text = run.tokenizer.decode(ids)
    if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
      continue
    print(text[len(shown):], end="", flush=True)
    shown = text
  print(run.tokenizer.decode(ids)[len(shown):], flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
