"""Passkey retrieval: a random 5-digit key planted at a chosen depth in filler text, asked for at the end.

    python -m train.passkey --workdir RUN [--lengths 1 2 4] [--depths 0.1 0.3 0.5 0.7 0.9] [--trials 8]

A sample of length ``L`` is ``<doc> filler[:cut] needle filler[cut:] question key``, cut at ``depth``
of the filler, with needle ``" The pass key is 12345. Remember it. "`` and question
``" What is the pass key? The pass key is "``. The key's tokens are read teacher-forced: a
trial is correct when the greedy prediction of every key token is right. Beside each cell sits
what the model's pattern allows in principle (``train.probe.reach``): whether the distance from the
question's last token back to the key's first token is reachable through the layers.
Writes ``RUN/passkey/<what was run>.json``.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from fibjax.cli import ArgumentParser
from train.cli import add_lengths, add_workdir, check_multiples, exit_with, run_command
from train.data import text as data
from train.probe import reach
from train.run import rundir
from train.run.evaluation import done_line, read_or_write
from train.run.restore import Run, load_run

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = (" The pass key is ", ". Remember it. ")  # the key goes between the two
QUESTION = " What is the pass key? The pass key is "
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def key_parts(tokenizer: data.Tokenizer, key: str) -> tuple[np.ndarray, ...]:
  """``(head, answer, tail, question)`` tokens (1-D int32): the needle is ``head answer tail``."""
  return tuple(tokenizer.encode(x) for x in (NEEDLE[0], key, NEEDLE[1], QUESTION))


def fixed_tokens(tokenizer: data.Tokenizer, key: str) -> int:
  """Tokens of a sample of ``key`` other than the filler: needle, question and the answer read after it."""
  head, answer, tail, question = key_parts(tokenizer, key)
  return len(head) + len(answer) + len(tail) + len(question) + len(answer)


def sample(tokenizer: data.Tokenizer, length: int, depth: float, key: str) -> tuple[np.ndarray, int, int]:
  """``(tokens_L1, key_start, answer_len)``: the sample's int32 tokens (``L1 = length + 1``), where the
  key's first token sits in the needle, and how many trailing tokens are the key (teacher-forced)."""
  head, answer, tail, question = key_parts(tokenizer, key)
  needle = np.concatenate([head, answer, tail])
  fill = length - fixed_tokens(tokenizer, key)
  if fill < 1:
    raise ValueError(f"length {length} is too short for a passkey sample (needs > {length - fill} tokens)")
  unit = tokenizer.encode(FILLER)
  filler = np.tile(unit, fill // len(unit) + 1)[:fill]
  cut = int(round(depth * fill))
  parts = [np.array([data.SEPARATOR], np.int32), filler[:cut], needle, filler[cut:], question, answer]
  tokens = np.concatenate(parts).astype(np.int32)
  return tokens, 1 + cut + len(head), len(answer)


def greedy_tail(graphdef: nnx.GraphDef, n: int) -> Callable[[Any, jax.Array], jax.Array]:
  """``fn(params, tokens_BxL1) -> preds_Bxn``: greedy predictions (int32) of the last ``n`` targets of
  ``tokens_BxL1`` (int32, ``L1 = L + 1``: the model reads ``tokens_BxL1[:, :-1]``)."""

  @jax.jit
  def fn(params: Any, tokens_BxL1: jax.Array) -> jax.Array:
    logits = nnx.merge(graphdef, params)(tokens_BxL1[:, :-1])
    return jnp.argmax(logits[:, -n:], axis=-1)

  return fn


def draw_keys(seed: int, trials: int) -> list[str]:
  """The ``trials`` 5-digit keys of ``seed``: every length and depth asks for the same ones."""
  return [f"{k:05d}" for k in np.random.default_rng(seed).integers(0, 100_000, trials)]


def check_lengths(run: Run, multiples: tuple[int, ...], keys: list[str]) -> None:
  """Raises ``ValueError`` naming ``--lengths`` when the shortest sample cannot hold a passkey."""
  t = run.cfg.model.seq_len
  need = max(fixed_tokens(run.tokenizer, k) for k in keys) + 1  # at least one filler token
  if min(multiples) * t < need:
    raise ValueError(f"--lengths {min(multiples)} gives {min(multiples) * t}-token samples (T={t}) but a passkey "
                     f"sample needs at least {need}: give --lengths of {-(-need // t)} or more")


def passkey(run: Run, multiples: tuple[int, ...] | None = None, depths: tuple[float, ...] = DEPTHS,
            trials: int = 8, seed: int = 0) -> dict[str, Any]:
  """Accuracy per (length, depth) over ``trials`` keys drawn from ``seed`` at ``multiples`` of T
  (default: the run's ``final_eval_multiples``); see the module doc."""
  multiples = tuple(multiples or run.cfg.final_eval_multiples)
  keys = draw_keys(seed, trials)
  hops = reach.hop_sets(nnx.merge(run.graphdef, run.params))
  t = run.cfg.model.seq_len
  ok_by_distance = reach.reachable(hops, max(multiples) * t)
  cells = []
  rows = max(1, run.cfg.batch_size // run.cfg.grad_accum)
  with jax.set_mesh(run.mesh):
    for m in multiples:
      length = m * t
      built = [sample(run.tokenizer, length, d, k) for d in depths for k in keys]
      n = built[0][2]
      fn = greedy_tail(run.graphdef, n)
      tokens = np.stack([b[0] for b in built])
      preds = []
      for i in range(0, len(tokens), max(1, rows // m)):
        batch = jax.device_put(tokens[i : i + max(1, rows // m)], NamedSharding(run.mesh, P()))
        preds.append(np.asarray(fn(run.params, batch)))
      hit = np.concatenate(preds) == tokens[:, -n:]
      query = length - n  # input position whose prediction is the key's first token
      for j, depth in enumerate(depths):
        sl = slice(j * trials, (j + 1) * trials)
        dist = [query - b[1] for b in built[sl]]
        cells.append({"multiple": m, "length": length, "depth": depth, "trials": trials,
                      "accuracy": float(hit[sl].all(axis=1).mean()), "token_accuracy": float(hit[sl].mean()),
                      "distance_mean": float(np.mean(dist)),
                      "reachable": float(np.mean([ok_by_distance[d] for d in dist]))})
  coverage = {f"{m}x": float(ok_by_distance[1 : m * t].mean()) for m in multiples}
  return {"step": run.step, "variant": run.cfg.model.variant, "seed": run.cfg.seed, "key_seed": seed,
          "cells": cells, "reachable_fraction": coverage}


def run_passkey(workdir: pathlib.Path, multiples: Sequence[int] | None = None, depths: Sequence[float] = DEPTHS,
                trials: int = 8, seed: int = 0, run: Run | None = None) -> tuple[pathlib.Path, dict]:
  """Runs (or reads, if already written under the same name) the passkey probe of ``workdir`` at
  ``multiples`` of T (default: the run's ``final_eval_multiples``)."""
  run = run or load_run(workdir)
  multiples = tuple(multiples or run.cfg.final_eval_multiples)
  path = passkey_path(run, multiples, depths, trials, seed)
  return read_or_write(path, lambda: passkey(run, multiples, tuple(depths), trials, seed))


def passkey_path(run: Run, multiples: Sequence[int] | None = None, depths: Sequence[float] = DEPTHS,
                 trials: int = 8, seed: int = 0) -> pathlib.Path:
  """Where ``run_passkey`` writes (or finds) this probe."""
  multiples = tuple(multiples or run.cfg.final_eval_multiples)
  name = (f"step{run.step}_x{'-'.join(map(str, multiples))}_d{'-'.join(f'{d:g}' for d in depths)}"
          f"_n{trials}_s{seed}.json")
  return run.workdir / rundir.PASSKEY / name


def check_arguments(args: argparse.Namespace) -> None:
  """Raises ``ValueError`` naming the first argument out of its range, and the range."""
  if args.trials < 1:
    raise ValueError(f"--trials must be >= 1, got {args.trials}")
  check_multiples(args.lengths)
  if not all(0 <= d <= 1 for d in args.depths):
    raise ValueError(f"--depths must be within [0, 1] (0: key at the start of the filler, 1: at its end), "
                     f"got {' '.join(f'{d:g}' for d in args.depths)}")
  if args.seed < 0:
    raise ValueError(f"--seed must be >= 0, got {args.seed}")


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  add_workdir(parser)
  add_lengths(parser)
  parser.add_argument("--depths", type=float, nargs="+", default=list(DEPTHS), help="key depth, 0..1 of the filler")
  parser.add_argument("--trials", type=int, default=8, help="keys per (length, depth)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the keys")
  return run_command(probe, parser, argv)


def probe(args: argparse.Namespace) -> int:
  """Runs (or reads) the passkey probe ``args`` ask for and prints each cell's accuracy."""
  check_arguments(args)
  run = load_run(args.workdir)
  lengths = tuple(args.lengths or run.cfg.final_eval_multiples)
  check_lengths(run, lengths, draw_keys(args.seed, args.trials))
  reused = passkey_path(run, lengths, tuple(args.depths), args.trials, args.seed).exists()
  path, record = run_passkey(args.workdir, lengths, tuple(args.depths), args.trials, args.seed, run=run)
  for c in record["cells"]:
    print(f"length {c['length']:>6} depth {c['depth']:.2f}: accuracy {c['accuracy']:.2f} "
          f"(tokens {c['token_accuracy']:.2f}; reachable {c['reachable']:.2f})")
  print(done_line(path, reused))
  return 0

if __name__ == "__main__":
  exit_with(main())
