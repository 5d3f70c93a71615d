"""``python -m train.sweep``: variants x seeds of one recipe, each run a normal workdir under one root.

    python -m train.sweep --root results/small                       # 7 variants x seeds 0 1 2, recipe small
    python -m train.sweep --root results/paper --config paper --variants dense fib-linear --seeds 0 1 \
        --set steps=2400 --per-gpu 3
    python -m train.sweep --root results/small                       # again: skips finished cells, resumes the rest

Each cell (``ROOT/<variant>-s<seed>``) runs ``python -m train.experiment`` in a process of its own:
training, evaluation at 1x/2x/4x T, passkey and sparsity-budget probes. ``--per-gpu`` cells share
each local GPU (each with ``0.9 / per_gpu`` of its memory) and cells spread over every GPU; on a
machine without GPUs they run one after another. A cell that fails is logged in
``ROOT/logs/<cell>.log`` and the others go on. Every variant with a given seed trains on the same
tokens in the same order (the data order depends on the seed alone). When every cell has finished,
``python -m train.latency ROOT`` measures inference latency with the device to itself.
``ROOT/sweep.json`` holds the recipe; a root holding another recipe is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

from train.study.experiment import CELL_FILE, check_overrides

SWEEP_FILE = "sweep.json"
COST_FILE = "sweep_cost.jsonl"
DEFAULT_PER_GPU = 7  # H200, `small` recipe: 7 cells on one GPU gave 3.8x the throughput of one at a time
# (benchmarks/results/NOTES.md, "Experiments")
DEFAULT_VARIANTS = ("dense", "fib-fixed", "fib-learned", "fib-linear", "fib-coprime", "pow2-fixed", "pow2-linear")


@dataclasses.dataclass
class Cell:
  variant: str
  seed: int
  workdir: pathlib.Path

  @property
  def name(self) -> str:
    return self.workdir.name

  @property
  def done(self) -> bool:
    return (self.workdir / CELL_FILE).exists()


def local_gpus() -> list[str]:
  """Visible GPU ids without starting a JAX backend (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi``)."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
  if shutil.which("nvidia-smi") is None:
    return []
  out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
  return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def override_map(overrides: list[str]) -> dict[str, str]:
  """``{key: value}`` of ``KEY=VALUE`` overrides, the last of a repeated key winning (as
  ``apply_overrides`` applies them): the same overrides in any order give the same map."""
  return dict(item.split("=", 1) if "=" in item else (item, None) for item in overrides)


def same_recipe(saved: dict, recipe: dict) -> bool:
  """Whether a saved ``sweep.json`` holds ``recipe``: the same config and the same overrides."""
  overrides = saved.get("overrides")
  return (saved.get("config") == recipe["config"] and isinstance(overrides, list)
          and override_map([str(o) for o in overrides]) == override_map(recipe["overrides"]))


def read_sweep_file(path: pathlib.Path) -> dict:
  """The recipe saved in ``path`` (``ROOT/sweep.json``); raises ``ValueError`` naming the file if it
  cannot be read or is not a JSON object."""
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}): it holds the sweep's recipe, "
                     '{"config": NAME, "overrides": [KEY=VALUE, ...]}; restore it, or use a new --root') from e
  if not isinstance(saved, dict):
    raise ValueError(f"{path} holds a JSON {type(saved).__name__}, not the sweep's recipe "
                     '{"config": NAME, "overrides": [KEY=VALUE, ...]}: restore it, or use a new --root')
  return saved


def check_root(root: pathlib.Path, recipe: dict) -> None:
  """Creates ``ROOT/sweep.json`` or checks that it holds ``recipe``; raises ``ValueError`` if not."""
  path = root / SWEEP_FILE
  if root.exists() and not root.is_dir():
    raise ValueError(f"--root {root} is a file, not a folder: give a folder for the sweep's runs")
  if path.exists():
    saved = read_sweep_file(path)
    if not same_recipe(saved, recipe):
      raise ValueError(f"{root} holds a sweep of another recipe ({saved.get('config')} with {saved.get('overrides')}); "
                       f"use a new --root for {recipe['config']} with {recipe['overrides']}")
    return
  if root.is_dir() and any(root.iterdir()):
    raise ValueError(f"{root} is not empty and holds no {SWEEP_FILE}: use a new --root")
  try:
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe, indent=2) + "\n")
  except OSError as e:
    raise ValueError(f"cannot create the sweep root {root} ({e.strerror or type(e).__name__}: {e.filename}): "
                     "give a --root whose parent folders can be created") from e


def read_run_config(path: pathlib.Path, root: pathlib.Path) -> dict:
  """A run's ``config.json`` under a sweep ``root``, read through ``TrainConfig.load`` (as a dict);
  raises ``ValueError`` naming the file when it is not a fibjax config."""
  from configs.base import TrainConfig  # noqa: PLC0415  (imports jax)

  try:
    return TrainConfig.load(path).to_dict()
  except (OSError, ValueError) as e:
    cause = e.__cause__ or e
    raise ValueError(f"{path} is not a fibjax config ({type(cause).__name__}: {cause}): move its folder out of "
                     f"{root}, or give one sweep's root") from e


def recipe_of(cfg: dict) -> dict:
  """What the runs of one sweep share: every field of a config dict but the seed and the variant,
  model fields as ``model.NAME``."""
  return {**{k: v for k, v in cfg.items() if k not in ("seed", "model")},
          **{f"model.{k}": v for k, v in cfg["model"].items() if k != "variant"}}


def check_one_recipe(root: pathlib.Path, configs: dict[str, dict]) -> None:
  """Raises ``ValueError`` when the runs' ``configs`` (``{run name: config dict}``) under ``root``
  are not one recipe (they differ in more than variant and seed), so comparing them would not
  compare like with like; names two runs and the first fields they differ in."""
  recipes: dict[str, tuple[str, dict]] = {}
  for name, cfg in configs.items():
    recipe = recipe_of(cfg)
    recipes.setdefault(json.dumps(recipe, sort_keys=True), (name, recipe))
    if len(recipes) > 1:
      (a, ra), (b, rb) = list(recipes.values())[:2]
      differ = sorted(k for k in ra.keys() | rb.keys() if ra.get(k) != rb.get(k))
      raise ValueError(f"{root} holds runs of more than one recipe ({a} and {b} differ in "
                       f"{', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''}): give one sweep's root")


def validate(config: str, variants: list[str], seeds: list[int], overrides: list[str],
             budgets: list[str] | None = None) -> None:
  """Checks the recipe before anything runs: builds every cell's config, checks the budget names."""
  import configs  # noqa: PLC0415
  from configs.base import apply_overrides  # noqa: PLC0415
  from train.study.experiment import check_budgets  # noqa: PLC0415

  if not variants or not seeds:
    raise ValueError("give at least one variant and one seed")
  if len(set(variants)) != len(variants):
    raise ValueError(f"--variants must be distinct, got {variants}")
  check_overrides(overrides, {"seed": "--seeds", "model.variant": "--variants"})
  for v in variants:
    apply_overrides(configs.get_config(config, v), [*overrides, f"seed={seeds[0]}"]).validate()
  if len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise ValueError(f"--seeds must be distinct and >= 0, got {seeds}")
  check_budgets(budgets)


def command(cell: Cell, recipe: dict, budgets: list[str] | None) -> list[str]:
  cmd = [sys.executable, "-m", "train.study.experiment", "--workdir", str(cell.workdir), "--config", recipe["config"],
         "--variant", cell.variant, "--seed", str(cell.seed), "--set", *recipe["overrides"], "progress=false"]
  return cmd + (["--budgets", *budgets] if budgets else [])


def progress(cell: Cell) -> float:
  """How far a cell is, 0..1: finished cells 1, else the share of its training steps logged."""
  if cell.done:
    return 1.0
  metrics, config = cell.workdir / "metrics.jsonl", cell.workdir / "config.json"
  if not metrics.exists() or not config.exists():
    return 0.0
  try:
    steps = json.loads(config.read_text())["steps"]
    lines = metrics.read_text().splitlines()
    last = json.loads(lines[-1]).get("step", 0) if lines else 0
  except (OSError, ValueError, KeyError, AttributeError):  # a file being written: no progress to count yet
    return 0.0
  return min(1.0, last / max(steps, 1)) * 0.9  # the probes after training take the rest


def status_line(cells: list[Cell], running: int, left: int, failed: int, elapsed: float, start_share: float) -> str:
  """``done / running / left`` and an ETA from the share of work done since this invocation began."""
  share = sum(progress(c) for c in cells) / len(cells)
  eta = "?"
  if share > start_share and share < 1:
    eta = f"{elapsed * (1 - share) / (share - start_share):.0f} s"
  done = sum(c.done for c in cells)
  return (f"[sweep] done {done} / running {running} / left {left}"
          f"{f' / failed {failed}' if failed else ''}  elapsed {elapsed:.0f} s  ETA {eta}")


def run_sweep(root: pathlib.Path, config: str, variants: list[str], seeds: list[int], overrides: list[str],
              per_gpu: int, budgets: list[str] | None = None, latency: bool = True, poll_s: float = 5.0) -> int:
  """Runs every unfinished cell; returns the number of cells that failed."""
  validate(config, variants, seeds, overrides, budgets)
  recipe = {"config": config, "overrides": list(overrides)}
  check_root(root, recipe)
  cells = [Cell(v, s, root / f"{v}-s{s}") for s in seeds for v in variants]
  todo = [c for c in cells if not c.done]
  gpus = local_gpus()
  slots = [(g, i) for g in gpus for i in range(per_gpu)] or [(None, 0)]
  (root / "logs").mkdir(exist_ok=True)
  start, running, failed, finished_now = time.time(), {}, [], 0
  start_share = sum(progress(c) for c in cells) / len(cells)
  print(f"[sweep] {len(cells)} cells, {len(cells) - len(todo)} already done; "
        f"{len(slots)} slots ({len(gpus)} GPUs x {per_gpu})" if gpus else
        f"[sweep] {len(cells)} cells, {len(cells) - len(todo)} already done; no GPU: one at a time", flush=True)
  last_status = 0.0
  try:
    while todo or running:
      free = [s for s in slots if s not in running.values()]
      while todo and free:
        cell, slot = todo.pop(0), free.pop(0)
        env = dict(os.environ)
        if slot[0] is not None:
          env.update(CUDA_VISIBLE_DEVICES=slot[0], XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / per_gpu:.3f}")
        log = (root / "logs" / f"{cell.name}.log").open("a")
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command(cell, recipe, budgets))}\n")
        log.flush()
        proc = subprocess.Popen(command(cell, recipe, budgets), stdout=log, stderr=subprocess.STDOUT, env=env)
        running[proc] = slot
        proc.cell, proc.log = cell, log  # type: ignore[attr-defined]
      time.sleep(poll_s)
      for proc in [p for p in running if p.poll() is not None]:
        del running[proc]
        proc.log.close()
        if proc.returncode == 0 and proc.cell.done:
          finished_now += 1
        else:
          failed.append(proc.cell)
          print(f"[sweep] {proc.cell.name} failed (exit {proc.returncode}); log: {root / 'logs' / proc.cell.name}.log",
                flush=True)
      if time.time() - last_status > 30 or not (todo or running):
        print(status_line(cells, len(running), len(todo), len(failed), time.time() - start, start_share), flush=True)
        last_status = time.time()
  except KeyboardInterrupt:  # the cells got the same SIGINT: each stops at a step, its checkpoint kept
    for proc in running:
      proc.wait(timeout=120)
    raise
  finally:
    with (root / COST_FILE).open("a") as f:
      f.write(json.dumps({"time": time.time(), "wall_s": time.time() - start, "cells_run": finished_now,
                          "failed": len(failed), "gpus": len(gpus), "per_gpu": per_gpu}) + "\n")
  if latency and not failed and all(c.done for c in cells) and not list(root.glob("latency*.json")):
    print("[sweep] measuring latency with the device to itself", flush=True)
    subprocess.run([sys.executable, "-m", "train.study.latency", str(root)], check=False)
  return len(failed)


def main(argv: list[str] | None = None) -> int:
  from fibjax.cli import ArgumentParser  # noqa: PLC0415  (this module imports nothing heavy at load)

  parser = ArgumentParser(description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", required=True, type=pathlib.Path)
  parser.add_argument("--config", default="small")
  parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides for every cell")
  parser.add_argument("--per-gpu", type=int, default=DEFAULT_PER_GPU, help="cells sharing one GPU")
  parser.add_argument("--budgets", nargs="*", default=None, help="sparsity budgets (default: all)")
  parser.add_argument("--no-latency", action="store_true", help="skip the closing latency measurement")
  args = parser.parse_args(argv)
  try:
    if args.per_gpu < 1:
      raise ValueError(f"--per-gpu must be >= 1, got {args.per_gpu}")
    failed = run_sweep(args.root, args.config, args.variants, args.seeds, list(args.set), args.per_gpu,
                       args.budgets, latency=not args.no_latency)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"error: cannot write under --root {args.root} ({e.strerror or type(e).__name__}: {e.filename}); free space "
          "or fix the folder's permissions, then run the same command again", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"\n[sweep] interrupted: finished cells and the others' checkpoints are kept under {args.root}; "
          "run the same command again to resume", file=sys.stderr)
    return 130
  if failed:
    print(f"[sweep] {failed} cell(s) failed; their logs are under {args.root / 'logs'}; run again to retry them",
          file=sys.stderr)
    return 1
  print(f"[sweep] all cells done under {args.root}; report: python -m train.report {args.root}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
