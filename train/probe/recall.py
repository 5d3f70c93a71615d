"""Recall by key-to-query distance at multiples of T, beside the distances each pattern can reach.

    python -m train.recall --workdir RUN                          # the run's task at its final_eval_multiples
    python -m train.recall --workdir RUN --task mqar --lengths 1 2 4 8 --samples 512
    python -m train.recall --workdir RUN --sink-window 4          # dense: T keys plus 4 sink tokens

At each length ``m x T`` the run's synthetic task (``train.data.tasks``; or ``--task`` for a run
trained on text) is drawn afresh with the same settings except the length, its distances uniform
over every distance the length allows, from an evaluation stream no training row uses. An answer
counts when every one of its tokens is the model's greedy (argmax) prediction under teacher
forcing. Accuracy is reported per distance bucket beside two fractions of that bucket's distances
``d``, each read at the relative distance ``d - 1`` the copy spans (the model predicts an answer's
first token at input position ``answer_start - 1``: ``train.data.tasks``): ``one_hop``, those some
single layer attends to directly (its window or an offset), and ``layers``, those a path through
all layers in order can span (``train.probe.reach``); a dense layer reaches everything. Each probe
is written to ``RUN/recall/<what was probed>.json`` and never overwrites another: the same probe
asked again is read back.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.tasks import TASKS, TaskSpec
from fibjax.cli import ArgumentParser
from train.cli import add_lengths, add_sink_window, add_workdir, check_multiples, check_sink_window, run_command
from train.data import tasks
from train.probe import reach
from train.run import rundir
from train.run.evaluation import done_line, read_or_write, sink_window_graph
from train.run.restore import Run, load_run

EVAL_STREAM = 1 << 30  # added to the run's seed: the probe's sequences are never training rows
DEFAULT_SAMPLES = 256  # sequences per length


def spec_at(spec: TaskSpec, length: int) -> TaskSpec:
  """``spec`` at ``length`` tokens: the same task, key vocabulary and pair/query/chain counts; a
  grid of distances kept as it is (the distances trained, read one by one at every length), any
  other law made uniform over every distance the length allows."""
  fixed = dataclasses.replace(spec, pairs=spec.pair_count if spec.name == "mqar" else spec.pairs,
                              chains=spec.chain_count if spec.name == "vartrack" else spec.chains)
  if spec.law.kind == "grid":
    return dataclasses.replace(fixed, seq_len=length).validate()
  longer = dataclasses.replace(fixed, seq_len=length, distance="uniform")
  return dataclasses.replace(longer, distance=f"uniform:{longer.shortest}:{longer.longest}").validate()


def bucket_edges(longest: int) -> list[int]:
  """Distance bucket edges: 1, then powers of two from 16 up past ``longest``."""
  edges, e = [1], 16
  while edges[-1] <= longest:
    edges.append(e)
    e *= 2
  return edges


def distance_edges(spec: TaskSpec) -> list[int]:
  """The buckets ``spec``'s accuracy is read in: one ``[d, d + 1)`` per distance of a grid, else
  ``bucket_edges`` (powers of two)."""
  if spec.law.kind == "grid":
    return sorted({e for d in spec.law.values for e in (d, d + 1)})
  return bucket_edges(spec.longest)


def reach_by_bucket(hops: list[np.ndarray | None], edges: Sequence[int]) -> list[dict[str, float]]:
  """Per bucket ``[edges[k], edges[k+1])`` of answer distances: the fractions of its distances one
  layer attends to (``one_hop``) and a path through every layer spans (``layers``). An answer at
  distance ``d`` (``train.data.tasks``: ``answer_start - value_start``) is predicted at input
  position ``answer_start - 1``, ``d - 1`` tokens after the value's first token (and every later
  answer token ``d - 1`` after its source): the bucket is reached at relative distances
  ``[lo - 1, hi - 1)``."""
  if edges[0] < 1:
    raise ValueError(f"answer distances start at 1, got a bucket edge {edges[0]}")
  relative = [e - 1 for e in edges]
  top = relative[-1]
  layers = reach.reachable(hops, top)
  one = np.zeros(top + 1, bool)
  for h in hops:
    if h is None:
      one[:] = True
      break
    one[h[h <= top]] = True
  return [{"one_hop": float(one[lo:hi].mean()), "layers": float(layers[lo:hi].mean())}
          for lo, hi in zip(relative[:-1], relative[1:])]


def predict_fn(graphdef: nnx.GraphDef):
  """``fn(params, tokens_BxL1) -> preds_BxL``: greedy predictions (int32) of every target."""

  @jax.jit
  def fn(params: Any, tokens_BxL1: jax.Array) -> jax.Array:
    return jnp.argmax(nnx.merge(graphdef, params)(tokens_BxL1[:, :-1]), axis=-1)

  return fn


def recall(run: Run, spec: TaskSpec, multiples: tuple[int, ...], samples: int = DEFAULT_SAMPLES,
           sinks: int | None = None) -> dict[str, Any]:
  """Exact-match accuracy of ``spec``'s answers at each multiple of T, by distance bucket, beside
  each bucket's reach (module doc). ``sinks``: a dense run evaluated with a sliding window of T
  keys plus that many sink tokens (``None``: its full causal attention)."""
  t = run.cfg.model.seq_len
  graphdef = run.graphdef if sinks is None else sink_window_graph(run.cfg, sinks)
  hops = reach.hop_sets(nnx.merge(graphdef, run.params))  # with sinks: a window of T keys, the sinks aside
  fn = predict_fn(graphdef)
  rows = max(1, run.cfg.batch_size // run.cfg.grad_accum)
  out: dict[str, Any] = {"step": run.step, "variant": run.cfg.model.variant, "seed": run.cfg.seed,
                         "task": dataclasses.asdict(spec), "samples": samples, "eval_seed": EVAL_STREAM + run.cfg.seed,
                         "sinks": sinks, "multiples": list(multiples)}
  with jax.set_mesh(run.mesh):
    for m in multiples:
      at = spec_at(spec, m * t)
      gen = tasks.TaskGenerator(at, run.tokenizer.encode)
      per = max(1, rows // m)
      correct, distance = [], []
      for i in range(0, samples, per):
        batch = tasks.task_batch(at, run.tokenizer.encode, EVAL_STREAM + run.cfg.seed,
                                 range(i, min(samples, i + per)), gen)
        preds = np.asarray(fn(run.params, jax.device_put(batch.tokens_BxT1, NamedSharding(run.mesh, P()))))
        correct.append(tasks.score(preds, batch.tokens_BxT1, batch.answers))
        distance.append(batch.answers.distance)
      correct_N, distance_N = np.concatenate(correct), np.concatenate(distance)
      edges = distance_edges(at)
      rows_by = tasks.accuracy_by_distance(correct_N, distance_N, edges)
      reach_rows = {tuple(e): r for e, r in zip(zip(edges[:-1], edges[1:]), reach_by_bucket(hops, edges))}
      for row in rows_by:
        row.update(reach_rows[tuple(row["distance"])])
      out[f"{m}x"] = {"length": m * t, "distance_law": at.distance, "answers": int(correct_N.size),
                      "accuracy": float(correct_N.mean()), "by_distance": rows_by}
  return out


def task_of(run: Run, name: str | None) -> TaskSpec:
  """The run's own task, or task ``name`` with its default settings at the run's T."""
  if name is None:
    if run.cfg.task is None:
      raise ValueError(f"{run.workdir} was trained on text alone: name a task with --task {{{','.join(TASKS)}}}")
    return run.cfg.task_spec()
  if run.cfg.task == name:
    return run.cfg.task_spec()
  return TaskSpec(name=name, seq_len=run.cfg.model.seq_len).validate()


def recall_path(run: Run, spec: TaskSpec, multiples: Sequence[int], samples: int, sinks: int | None) -> pathlib.Path:
  """Where ``run_recall`` writes (or finds) this probe."""
  sink = "" if sinks is None else f"_sink{sinks}"
  name = f"step{run.step}_{spec.name}_x{'-'.join(map(str, multiples))}_n{samples}{sink}.json"
  return run.workdir / rundir.RECALL / name


def run_recall(workdir: pathlib.Path, task: str | None = None, multiples: Sequence[int] | None = None,
               samples: int = DEFAULT_SAMPLES, sinks: int | None = None, run: Run | None = None
               ) -> tuple[pathlib.Path, dict]:
  """Runs (or reads, if already written under the same name) the recall probe of ``workdir`` at
  ``multiples`` of T (default: the run's ``final_eval_multiples``)."""
  run = run or load_run(workdir)
  multiples = tuple(sorted(set(multiples or run.cfg.final_eval_multiples)))
  spec = task_of(run, task)
  for m in multiples:
    spec_at(spec, m * run.cfg.model.seq_len)  # refuses a length the task cannot fill before anything runs
  path = recall_path(run, spec, multiples, samples, sinks)
  return read_or_write(path, lambda: recall(run, spec, multiples, samples, sinks))


def print_record(path: pathlib.Path, record: dict, reused: bool) -> None:
  for m in record["multiples"]:
    r = record[f"{m}x"]
    buckets = "  ".join(f"[{b['distance'][0]},{b['distance'][1]}) {b['accuracy']:.2f}" for b in r["by_distance"])
    print(f"{m}x T={r['length']}: recall {r['accuracy']:.3f} of {r['answers']} answers | {buckets}")
  print(done_line(path, reused))


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_workdir(parser)
  add_lengths(parser)
  parser.add_argument("--task", choices=TASKS, default=None, help="default: the task the run trained on")
  parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="sequences per length")
  add_sink_window(parser)

  def body(args: argparse.Namespace) -> int:
    check_multiples(args.lengths)
    if args.samples < 1:
      raise ValueError(f"--samples must be >= 1, got {args.samples}")
    check_sink_window(args.sink_window)
    run = load_run(args.workdir)
    multiples = tuple(sorted(set(args.lengths or run.cfg.final_eval_multiples)))
    spec = task_of(run, args.task)
    reused = recall_path(run, spec, multiples, args.samples, args.sink_window).exists()
    path, record = run_recall(args.workdir, args.task, multiples, args.samples, args.sink_window, run)
    print_record(path, record, reused)
    return 0

  return run_command(body, parser, argv)
