"""``python -m train.generate --workdir RUN --prompt "..."``: continue a prompt with a trained run.

Restores the newest intact Orbax checkpoint of ``RUN`` (``train.run.restore.load_run``) and streams the
continuation to stdout as tokens come (bounded KV cache for sparse variants; see ``fibjax.generate``).
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
from flax import nnx

from fibjax.cli import ArgumentParser
from fibjax.generate import stream
from train.cli import add_workdir, exit_with, run_command

SEEDS = 2**32  # jax.random.key keeps 32 bits of the seed: larger ones would repeat smaller ones' samples
MAX_NEW_TOKENS = 2**30  # positions are int32: this leaves room for any prompt


def check_arguments(args: argparse.Namespace) -> None:
  """Raises ``ValueError`` naming a bad argument and its accepted range, before anything is loaded."""
  if not args.prompt:
    raise ValueError("the prompt is empty: give some text to continue, e.g. --prompt 'Fellow-Citizens'")
  check_utf8(args.prompt)
  if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
    raise ValueError(f"--max-new-tokens must be within [1, 2**30] (positions are 32-bit), got {args.max_new_tokens}")
  if not (math.isfinite(args.temperature) and args.temperature >= 0):
    raise ValueError(f"--temperature must be a number >= 0 (0: greedy), got {args.temperature}")
  if args.top_k < 0:
    raise ValueError(f"--top-k must be >= 0 (0: sample from the whole vocabulary), got {args.top_k}")
  if not 0 <= args.seed < SEEDS:
    raise ValueError(f"--seed must be within [0, 2**32), got {args.seed}")
  from train.run.restore import check_run_folder  # noqa: PLC0415  (heavy: after the other checks)

  check_run_folder(args.workdir)


def check_utf8(prompt: str) -> None:
  """Raises ``ValueError`` naming the first byte of ``prompt`` that is not UTF-8 (Python keeps such
  bytes of a command line as lone surrogates, which no tokenizer can encode)."""
  try:
    prompt.encode("utf-8")
  except UnicodeEncodeError as e:
    char = prompt[e.start]
    byte = f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"character {char!r}"
    raise ValueError(f"--prompt is not UTF-8 text ({byte} at character {e.start}): give the prompt in UTF-8 "
                     "(e.g. set the terminal's encoding to UTF-8, or convert the text with iconv)") from None


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(description=__doc__)
  add_workdir(parser)
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--max-new-tokens", type=int, default=200)
  parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
  parser.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens; 0: all (default 40)")
  parser.add_argument("--seed", type=int, default=0)
  return run_command(generate, parser, argv)


def generate(args: argparse.Namespace) -> int:
  """Streams the continuation of ``--prompt`` to stdout; stopped early (an error, Ctrl-C), it ends
  the text it printed with a newline."""
  check_arguments(args)
  from train.run.restore import load_run  # noqa: PLC0415  (heavy: after the argument checks)

  run = load_run(args.workdir)
  vocab = run.cfg.model.vocab_size
  if args.top_k > vocab:
    raise ValueError(f"--top-k must be <= the vocabulary size {vocab} of this run (0: all), got {args.top_k}")
  model = nnx.merge(run.graphdef, run.params)
  prompt = run.tokenizer.encode(args.prompt)
  if run.cfg.tokenizer == "byte":
    prompt = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.asarray(prompt)])  # documents start with 0
  print(args.prompt, end="", flush=True)
  ids: list[int] = []
  shown = ""
  try:
    for token in stream(model, jnp.asarray(prompt, jnp.int32)[None], args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, seed=args.seed):
      ids.append(int(token[0]))
      text = run.tokenizer.decode(ids)
      if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
        continue
      print(text[len(shown):], end="", flush=True)
      shown = text
  except jax.errors.JaxRuntimeError as e:  # e.g. no memory for the KV cache of a long generation
    from train.run.checkpoint import short  # noqa: PLC0415

    raise ValueError(f"generation failed ({short(e)}); try a smaller --max-new-tokens") from e
  finally:
    print(run.tokenizer.decode(ids)[len(shown):], flush=True)  # the rest, and the line's end
  return 0


if __name__ == "__main__":
  exit_with(main())
