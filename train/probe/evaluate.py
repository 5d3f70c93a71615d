"""Held-out evaluation at multiples of the training length T, on identical target tokens.

    python -m train.evaluate --workdir RUN                        # the run's held-out split at its final_eval_multiples
    python -m train.evaluate --workdir RUN --lengths 1 2 4 8 --data my_text.txt --tokens 262144
    python -m train.evaluate --workdir DENSE_RUN --sink-window 4  # sliding window of T keys + 4 sink tokens

Every length scores the same targets: the held-out stream is cut into chunks of ``lcm(lengths) x T``
targets and each length tiles every chunk with consecutive windows, so a longer window differs
only in how much context each target has (a paired comparison). Parameters alone are restored,
from the newest checkpoint that restores intact (a damaged newer one is skipped with a warning and
left in place); neither the optimizer state nor the training corpus is needed. Each evaluation is
written to ``RUN/evals/<what was evaluated>.json`` and never overwrites another: the same
evaluation asked again is read back from its file ("reused PATH"), not recomputed.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

from fibjax.cli import ArgumentParser
from train.cli import add_lengths, add_sink_window, add_workdir, check_multiples, check_sink_window, exit_with, run_command
from train.data import text as data
from train.run.evaluation import check_fits, done_line, evaluate_into, evaluation_path, rise_key, sorted_lengths
from train.run.restore import Run, load_run


def tokens_of(path: str, tokenizer: data.Tokenizer) -> np.ndarray:
  """Every document under ``path`` as one evaluation stream (the user's text is all held out)."""
  if not pathlib.Path(path).exists():
    raise ValueError(f"--data {path!r} does not exist: give a .txt/.jsonl file or a folder of them")
  if data.is_prepared(pathlib.Path(path)):
    source = data.read_manifest(pathlib.Path(path)).get("source", "its source")
    raise ValueError(f"--data {path} is a prepared token folder (python -m train.prepare); evaluation reads text: "
                     f"give a .txt/.jsonl file or a folder of them, e.g. the text it was prepared from ({source})")
  return data.tokenize(data.load_documents(path, purpose="evaluation"), tokenizer)


def run_evaluation(workdir: pathlib.Path, multiples: tuple[int, ...] | None = None, data_path: str | None = None,
                   max_targets: int | None = None, run: Run | None = None, sinks: int | None = None
                   ) -> tuple[pathlib.Path, dict]:
  """Evaluates ``workdir``'s newest intact checkpoint (``load_run``, ``evaluate_into``) at
  ``multiples`` of T (default: the run's ``final_eval_multiples``); ``sinks`` as ``evaluate_into``'s."""
  run = run or load_run(workdir)
  tokens = run.heldout() if data_path is None else tokens_of(data_path, run.tokenizer)
  return evaluate_into(run.workdir, run.step, run.cfg, run.mesh, run.graphdef, run.params, tokens,
                       multiples or run.cfg.final_eval_multiples, max_targets or run.cfg.final_eval_tokens, data_path,
                       sinks)


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  add_workdir(parser)
  add_lengths(parser)
  parser.add_argument("--data", default=None, help="held-out .txt/.jsonl file or folder (default: the run's own split)")
  parser.add_argument("--tokens", type=int, default=None, help="target tokens per length (default: the config's)")
  add_sink_window(parser)
  return run_command(evaluate, parser, argv)


def evaluate(args: argparse.Namespace) -> int:
  """Evaluates the run at ``--lengths`` and prints each length's perplexity."""
  if args.tokens is not None and args.tokens < 1:
    raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
  check_multiples(args.lengths)
  check_sink_window(args.sink_window)
  if args.data is not None and not pathlib.Path(args.data).exists():
    raise ValueError(f"--data {args.data!r} does not exist: give a .txt/.jsonl file or a folder of them")
  run = load_run(args.workdir)
  tokens = run.heldout() if args.data is None else tokens_of(args.data, run.tokenizer)
  max_targets = args.tokens or run.cfg.final_eval_tokens
  multiples = sorted_lengths(args.lengths or run.cfg.final_eval_multiples)
  check_fits(tokens, run.cfg.model.seq_len, multiples,
             "the run's held-out split" if args.data is None else f"--data {args.data}")
  reused = evaluation_path(run.workdir, run.step, tokens, multiples, max_targets, args.data, args.sink_window).exists()
  path, record = evaluate_into(run.workdir, run.step, run.cfg, run.mesh, run.graphdef, run.params, tokens,
                               multiples, max_targets, args.data, args.sink_window)
  for m in record["multiples"]:
    r = record[f"{m}x"]
    rise = r[rise_key(record["multiples"])]
    print(f"{m}x T={r['length']}: loss {r['loss']:.4f} ppl {r['ppl']:.3f} ({100 * rise:+.1f}%)")
  print(f"{record['targets']:,} identical targets per length; {done_line(path, reused)}")
  return 0

if __name__ == "__main__":
  exit_with(main())
