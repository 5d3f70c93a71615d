"""Host time of the synthetic tasks' training rows: ``TaskGenerator.sample`` for each named recipe
with a task, at the byte-level tokenizer the recipes train with. In a task study the host makes
every row of every step (one Python thread per cell), so this bounds a cell's steps per second.

    python -m benchmarks.task_data [--configs recall recall128 ...] [--samples 2000] [--repeats 5]

Prints, per recipe, the median over ``--repeats`` passes of ``--samples`` rows (each pass a fresh
generator at another seed): milliseconds per row and rows per second, and the steps per second
one core's rows allow at the recipe's batch size; then the milliseconds per step of the trainer's
own input pipeline (``train.run.trainer.training_stream`` on the recipe's corpus: Grain, its
prefetch threads, the recipe's batch and task mix), the mean over ``--steps`` steps after the first.
"""

from __future__ import annotations

import pathlib
import statistics
import tempfile
import time

import configs
from benchmarks.cli import at_least
from fibjax.cli import ArgumentParser
from train.data.tasks import TaskGenerator
from train.data.text import ByteTokenizer
from train.run import trainer


def ms_per_row(name: str, samples: int, repeats: int) -> float:
  """Median over ``repeats`` passes of the milliseconds ``TaskGenerator.sample`` takes per row of
  recipe ``name``."""
  spec, encode = configs.get_config(name).task_spec(), ByteTokenizer().encode
  times = []
  for seed in range(repeats):
    gen = TaskGenerator(spec, encode)
    start = time.perf_counter()
    for index in range(samples):
      gen.sample(seed, index)
    times.append((time.perf_counter() - start) / samples * 1e3)
  return statistics.median(times)


def ms_per_step(name: str, steps: int) -> float:
  """Milliseconds per batch of the trainer's input pipeline for recipe ``name`` on its corpus: the
  mean over ``steps`` batches after the first (the pipeline prefetches, so batches come in bursts)."""
  cfg = configs.get_config(name)
  with tempfile.TemporaryDirectory() as workdir:  # a byte-level run reads nothing from it
    batches = iter(trainer.training_stream(cfg, trainer.load_data(cfg, pathlib.Path(workdir), None)))
    next(batches)
    start = time.perf_counter()
    for _ in range(steps):
      next(batches)
    return (time.perf_counter() - start) / steps * 1e3


def main(argv: list[str] | None = None) -> None:
  parser = ArgumentParser(description=__doc__)
  parser.add_argument("--configs", nargs="+", default=["recall", "recall128"],
                      choices=sorted(configs.CONFIGS))
  parser.add_argument("--samples", type=at_least(1, "--samples"), default=2000)
  parser.add_argument("--repeats", type=at_least(1, "--repeats"), default=5)
  parser.add_argument("--steps", type=at_least(1, "--steps"), default=100)
  args = parser.parse_args(argv)
  recipes = {name: configs.get_config(name) for name in args.configs}
  for name, cfg in recipes.items():
    if cfg.task_spec() is None:
      parser.error(f"--configs {name}: this recipe trains on text alone; name recipes with a task")
  for name, cfg in recipes.items():
    ms, batch = ms_per_row(name, args.samples, args.repeats), cfg.batch_size
    print(f"{name}: {ms:.3f} ms/row, {1e3 / ms:.0f} rows/s, {1e3 / ms / batch:.1f} steps/s of {batch} rows per core;"
          f" pipeline {ms_per_step(name, args.steps):.1f} ms/step")


if __name__ == "__main__":
  main()
