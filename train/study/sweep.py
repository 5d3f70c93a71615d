r"""``python -m train.sweep``: variants x seeds of one recipe, each run a normal workdir under one root.

    python -m train.sweep --root runs/small                          # 9 variants (7 + 2 controls) x seeds 0 1 2
    python -m train.sweep --root runs/recall --config recall --seeds 0 1 2 3 4 --set deterministic=true  # recall, 2 layers
    python -m train.sweep --root runs/paper --config paper --variants dense fib-linear --seeds 0 1 \
        --set steps=2400 --per-gpu 3
    python -m train.sweep --root runs/small                          # again: skips finished cells, resumes the rest
    python -m train.sweep --root runs/recall --seeds 5 6             # more seeds of the root's recipe and variants
    python -m train.sweep --root runs/small --list                   # one train.experiment command per unfinished cell

Each cell (``ROOT/<variant>-s<seed>``) runs ``python -m train.experiment`` in a process of its own:
training, then its probes (``train.study.experiment.probe_cell``: perplexity at the config's
multiples of T on held-out and other-genre text, passkey and sparsity budget for text runs, recall
by distance for task runs, dense again with a sink window). ``--per-gpu`` cells share
each local GPU (by default as many as its memory holds at the recipe's footprint, each keeping
memory for CUDA beside XLA's pool: ``train.study.packing``) and cells spread over every GPU; on a
machine without GPUs they run one after another. A cell that fails is logged in
``ROOT/logs/<cell>.log`` and the others go on; one that met a transient GPU error (cuBLAS without
memory, a failed launch) is started once more, and its failure line names the fix. One sweep at a
time runs on a root (a lock on ``ROOT/.lock``). Ctrl-C stops every cell at its next step (their
checkpoints kept) within ``STOP_GRACE_S`` seconds, or kills it then. Every variant with a given
seed trains on the same tokens in the same order (the data order depends on the seed alone). When
every cell has finished, ``python -m train.latency ROOT`` measures inference latency with the
device to itself. ``ROOT/sweep.json`` holds the recipe and the variants and seeds its sweeps asked
for: a root holding another recipe is refused, and a sweep run again without ``--variants`` or
``--seeds`` takes the root's. A root holding committed results (finished cells whose checkpoints
were not kept, as under ``results/``) is refused unless ``--extend`` asks to train its missing cells
beside them (a study that spans sessions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

from train.cli import add_overrides, check_writable, exit_with, override_map, run_command, write_whole
from train.run import rundir
from train.study import packing, sweeproot
from train.study.experiment import check_overrides

STOP_GRACE_S = 60.0  # after Ctrl-C, how long a cell has to reach its next step and stop before it is killed
# fibjax.model's SWEEP_VARIANTS (SPEC section 2), then its CONTROL_VARIANTS: the window alone, and as
# many offsets per layer as fib-linear's at random distances (spelled out: importing fibjax is slow)
DEFAULT_VARIANTS = ("dense", "fib-fixed", "fib-learned", "fib-linear", "fib-coprime", "pow2-fixed", "pow2-linear",
                    "window", "fib-random")


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
    return (self.workdir / rundir.CELL).exists()


def local_gpus() -> list[str]:
  """Visible GPU ids without starting a JAX backend (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi``)."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
  if shutil.which("nvidia-smi") is None:
    return []
  out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
  return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


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


def recipe_flags(recipe: dict) -> str:
  """A sweep recipe as the flags that ask for it: ``--config NAME [--set KEY=VALUE ...]``."""
  overrides = recipe.get("overrides") or []
  return " ".join([f"--config {recipe.get('config')}", *(["--set", *map(str, overrides)] if overrides else [])])


def check_not_committed(root: pathlib.Path) -> None:
  """Raises ``ValueError`` when ``root`` holds a finished cell without checkpoints: committed results
  (``results/``, whose checkpoints were left out), which a sweep extends only when asked (``--extend``)."""
  kept = next((c.parent for c in sorted(root.glob(f"*/{rundir.CELL}")) if not rundir.saved_steps(c.parent)), None)
  if kept is not None:
    raise ValueError(f"{root} holds committed results ({kept.name} is finished but its checkpoints were not kept): "
                     "give a new --root, or add --extend to train the missing cells beside them")


def asked_grid(root: pathlib.Path, variants: list[str] | None, seeds: list[int] | None) -> tuple[list[str], list[int]]:
  """``(variants, seeds)``: those given, else those the root's sweeps asked for (``ROOT/sweep.json``;
  a root whose file records none: its cell folders' variants and seeds), else ``DEFAULT_VARIANTS`` and
  seeds 0 1 2. Run again without flags, a sweep continues the root's cells."""
  path = root / sweeproot.SWEEP
  saved = read_sweep_file(path) if path.is_file() else {}
  held_variants, held_seeds = sweeproot.cells_held(root)
  return (variants or saved.get("variants") or held_variants or list(DEFAULT_VARIANTS),
          seeds or saved.get("seeds") or held_seeds or [0, 1, 2])


def saved_recipe(root: pathlib.Path) -> tuple[str | None, list[str]]:
  """``(config, overrides)`` of ``root``'s ``sweep.json`` (``(None, [])`` without one)."""
  path = root / sweeproot.SWEEP
  saved = read_sweep_file(path) if path.is_file() else {}
  return saved.get("config"), [str(o) for o in saved.get("overrides") or []]


def asked_recipe(root: pathlib.Path, config: str | None, overrides: list[str]) -> tuple[str, list[str]]:
  """``(config, overrides)``: those given, else the recipe the root's sweeps ran (``saved_recipe``),
  else ``small`` with none. Run again without ``--config`` and ``--set``, a sweep continues the root's recipe."""
  saved_config, saved_overrides = saved_recipe(root)
  if config is None and not overrides and saved_config:
    return str(saved_config), saved_overrides
  return config or str(saved_config or "small"), overrides


def check_root(root: pathlib.Path, recipe: dict, write: bool = True, extend: bool = False) -> None:
  """Checks that ``ROOT/sweep.json`` holds ``recipe`` (its config and overrides) and that ``root``
  holds no committed results unless ``extend``; raises ``ValueError`` if not. With ``write``, creates
  the file, and adds the recipe's ``variants`` and ``seeds`` to those it records (the root's cells so far)."""
  path = root / sweeproot.SWEEP
  if root.exists() and not root.is_dir():
    raise ValueError(f"--root {root} is a file, not a folder: give a folder for the sweep's runs")
  if root.is_dir() and not extend:
    check_not_committed(root)
  if path.exists():
    saved = read_sweep_file(path)
    if not same_recipe(saved, recipe):
      raise ValueError(f"{root} holds a sweep of another recipe ({recipe_flags(saved)}): leave out --config and --set "
                       f"(or give those flags) to continue it, or a new --root for {recipe_flags(recipe)}")
    grown = {k: [*saved.get(k, []), *(x for x in recipe[k] if x not in saved.get(k, []))]
             for k in ("variants", "seeds") if k in recipe}
    if write and any(saved.get(k) != v for k, v in grown.items()):
      write_whole(path, json.dumps({**saved, **grown}, indent=2) + "\n")
    return
  if root.is_dir() and any(root.iterdir()):
    raise ValueError(f"{root} is not empty and holds no {sweeproot.SWEEP}: use a new --root")
  if not write:
    return
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


CELL_MODEL_FIELDS = ("variant", "random_offsets", "offset_seed")  # set per cell: its variant, a *-random draw


def recipe_of(cfg: dict) -> dict:
  """What the runs of one sweep share: every field of a config dict but the seed and the model
  fields each cell sets itself (``CELL_MODEL_FIELDS``), model fields as ``model.NAME``."""
  return {**{k: v for k, v in cfg.items() if k not in ("seed", "model")},
          **{f"model.{k}": v for k, v in cfg["model"].items() if k not in CELL_MODEL_FIELDS}}


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
             budgets: list[str] | None = None, backend: str | None = None) -> None:
  """Checks the recipe before anything runs: builds every cell's config (checked against
  ``backend``, ``"cpu"`` or ``"gpu"``, where the cells run here), checks the budget names."""
  import configs  # noqa: PLC0415
  from configs.base import apply_overrides  # noqa: PLC0415
  from train.study.experiment import check_budgets  # noqa: PLC0415

  if not variants or not seeds:
    raise ValueError("give at least one variant and one seed")
  if len(set(variants)) != len(variants):
    raise ValueError(f"--variants must be distinct, got {variants}")
  check_overrides(overrides, {"seed": "--seeds", "model.variant": "--variants"})
  for v in variants:
    cfg = apply_overrides(configs.get_config(config, v), [*overrides, f"seed={seeds[0]}"]).validate()
    if backend is not None:
      cfg.check_backend(backend)
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
  metrics, config = cell.workdir / rundir.METRICS, cell.workdir / rundir.CONFIG
  if not metrics.exists() or not config.exists():
    return 0.0
  try:
    steps = json.loads(config.read_text())["steps"]
    lines = metrics.read_text().splitlines()
    last = json.loads(lines[-1]).get("step", 0) if lines else 0
  except (OSError, ValueError, KeyError, AttributeError):  # a file being written: no progress to count yet
    return 0.0
  return min(1.0, last / max(steps, 1)) * 0.9  # the probes after training take the rest


@dataclasses.dataclass
class Eta:
  """Seconds left, from the share of the work done since ``start`` (when ``start_share`` was done).
  Progress arrives in steps (a cell logs its steps now and then): between two steps the estimate
  made at the last one counts down, instead of growing with the time since."""

  start: float
  start_share: float
  share: float = -1.0
  left_s: float | None = None  # the estimate when ``share`` was reached, at ``at``
  at: float = 0.0

  def __call__(self, share: float, now: float) -> float | None:
    """The seconds left at ``now`` with ``share`` (0..1) of the work done; ``None`` before any progress."""
    if share != self.share:
      done = share - self.start_share
      self.share, self.at = share, now
      self.left_s = (now - self.start) * (1 - share) / done if done > 0 else None
    return None if self.left_s is None else max(0.0, self.left_s - (now - self.at))


def status_line(cells: list[Cell], running: int, left: int, failed: int, elapsed: float, eta_s: float | None) -> str:
  """``done / running / left``, the time so far and, while cells run or wait, the time left."""
  done = sum(c.done for c in cells)
  eta = "" if not (running or left) else f"  ETA {'?' if eta_s is None else f'{eta_s:.0f} s'}"
  return (f"[sweep] done {done} / running {running} / left {left}"
          f"{f' / failed {failed}' if failed else ''}  elapsed {elapsed:.0f} s{eta}")


def share_done(cells: list[Cell]) -> float:
  """The share of the sweep's work done, 0..1 (``progress`` of every cell)."""
  return sum(progress(c) for c in cells) / len(cells)


def gpu_packing(root: pathlib.Path, config: str, gpus: list[str], asked: int | None) -> packing.Packing | None:
  """How the cells share each of ``gpus`` (``train.study.packing``); ``None`` without GPUs."""
  if not gpus:
    return None
  need, need_from = packing.footprint(root, config)
  gpu_bytes = packing.gpu_memory(gpus)
  if gpu_bytes is None:
    gpu_bytes, need_from = packing.DEFAULT_GPU_BYTES, f"{need_from}; GPU memory assumed 80 GB: nvidia-smi did not say"
  return packing.plan(gpu_bytes, need, need_from, asked, free_bytes=packing.gpu_memory(gpus, "memory.free"))


def attempt_log(path: pathlib.Path, offset: int) -> str:
  """What a cell's log holds from ``offset`` (where its last attempt began) on."""
  try:
    with path.open("rb") as f:
      f.seek(offset)
      return f.read().decode(errors="replace")
  except OSError:
    return ""


def failure_line(cell: Cell, code: int, log: pathlib.Path, error: str | None, per_gpu: int | None,
                 retried: bool) -> str:
  """The line that names a failed cell, its log and, for a GPU error, the fix."""
  line = f"[sweep] {cell.name} failed (exit {code}{', after a retry' if retried else ''}); log: {log}"
  if error is None:
    return line
  if per_gpu and per_gpu > 1:
    return f"{line}; it met {error!r}: fewer cells per GPU leave each more memory, e.g. --per-gpu {per_gpu // 2}"
  return f"{line}; it met {error!r} with its GPU to itself (--per-gpu 1): its log says more"


def signal_group(proc: subprocess.Popen, sig: int) -> None:
  """Sends ``sig`` to the process group of ``proc`` (a cell and anything it started)."""
  try:
    os.killpg(proc.pid, sig)
  except ProcessLookupError:  # it ended already
    pass


def stop_cells(procs: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
  """Sends Ctrl-C (SIGINT) to the cells ``procs``, each of which stops at its next step (its
  checkpoints kept) or its next probe, waits up to ``grace_s`` for them, then kills what is left
  (a second Ctrl-C kills at once): no cell outlives the sweep."""
  live = [p for p in procs if p.poll() is None]
  if not live:
    return
  print(f"[sweep] stopping {len(live)} running cell(s); each keeps its checkpoints", flush=True)
  for proc in live:
    signal_group(proc, signal.SIGINT)
  deadline = time.monotonic() + grace_s
  try:
    for proc in live:
      proc.wait(timeout=max(0.0, deadline - time.monotonic()))
  except (subprocess.TimeoutExpired, KeyboardInterrupt):
    pass
  finally:
    for proc in live:
      if proc.poll() is None:
        signal_group(proc, signal.SIGKILL)
        proc.wait()


def sweep_cells(root: pathlib.Path, variants: list[str], seeds: list[int], reruns: int = 0) -> list[Cell]:
  """Every cell of a sweep in the order it runs: seed by seed, each seed's variants in turn, then
  ``reruns`` more runs of each variant at the first seed (``ROOT/<variant>-s<seed>-rerun<k>``).
  Raises ``ValueError`` naming the unfinished cells no run can finish: trained (``eval.json``) but
  without a checkpoint, so their probes cannot run and training again would write over their files."""
  cells = [Cell(v, s, root / sweeproot.cell_name(v, s)) for s in seeds for v in variants]
  cells += [Cell(v, seeds[0], root / sweeproot.cell_name(v, seeds[0], k)) for k in range(1, reruns + 1) for v in variants]
  stuck = [c.name for c in cells if not c.done and rundir.is_finished(c.workdir) and not rundir.saved_steps(c.workdir)]
  if stuck:
    raise ValueError(f"{', '.join(stuck)} under {root} finished training but kept no checkpoint, so their probes "
                     "cannot run: move those folders out of the root to train them again")
  return cells


def run_sweep(root: pathlib.Path, config: str, variants: list[str] | None, seeds: list[int] | None,
              overrides: list[str], per_gpu: int | None = None, budgets: list[str] | None = None, latency: bool = True,
              poll_s: float = 5.0, reruns: int = 0, extend: bool = False) -> int:
  """Runs every unfinished cell (``per_gpu`` cells on each GPU, default: as many as its memory
  holds, ``train.study.packing``) holding the root's lock, so that a second sweep on the same root
  is refused; returns the number of cells that failed."""
  from train.run.workdir import workdir_lock  # noqa: PLC0415  (imports jax)

  variants, seeds = asked_grid(root, variants, seeds)
  validate(config, variants, seeds, overrides, budgets, "gpu" if local_gpus() else "cpu")
  recipe = {"config": config, "overrides": list(overrides), "variants": list(variants), "seeds": list(seeds)}
  cells = sweep_cells(root, variants, seeds, reruns)
  check_root(root, recipe, extend=extend)
  check_writable(root, "--root")
  with workdir_lock(root, busy=f"another sweep is running on {root}; wait for it to end, or give another --root"):
    return run_cells(root, recipe, cells, per_gpu, budgets, latency, poll_s)


def list_cells(root: pathlib.Path, config: str, variants: list[str] | None, seeds: list[int] | None,
               overrides: list[str], budgets: list[str] | None = None, reruns: int = 0,
               extend: bool = False) -> list[str]:
  """One shell command per unfinished cell, ``python -m train.experiment ...`` with the cell's
  absolute workdir, for a scheduler (a SLURM array, any job runner) that spreads the cells over
  hosts sharing ``root``. The recipe is checked against ``ROOT/sweep.json`` as a sweep checks
  it; nothing is written."""
  variants, seeds = asked_grid(root, variants, seeds)
  validate(config, variants, seeds, overrides, budgets)
  recipe = {"config": config, "overrides": list(overrides)}
  check_root(root, recipe, write=False, extend=extend)
  cells = sweep_cells(root.absolute(), variants, seeds, reruns)
  return [shlex.join(["python", "-m", "train.experiment", *command(c, recipe, budgets)[3:]])
          for c in cells if not c.done]


def run_cells(root: pathlib.Path, recipe: dict, cells: list[Cell], per_gpu: int | None, budgets: list[str] | None,
              latency: bool, poll_s: float) -> int:
  """``run_sweep`` once the recipe is checked and the root locked."""
  todo = [c for c in cells if not c.done]
  gpus = local_gpus()
  packed = gpu_packing(root, recipe["config"], gpus, per_gpu)
  slots = [(g, i) for g in gpus for i in range(packed.per_gpu)] if packed else [(None, 0)]
  (root / sweeproot.LOGS).mkdir(exist_ok=True)
  start, running, failed, retried, finished_now = time.time(), {}, [], set(), 0
  eta = Eta(start, share_done(cells))
  print(f"[sweep] {len(cells)} cells, {len(cells) - len(todo)} already done; "
        f"{len(slots)} slots on {len(gpus)} GPU(s): {packed.describe()}" if packed else
        f"[sweep] {len(cells)} cells, {len(cells) - len(todo)} already done; no GPU: one at a time", flush=True)
  if packed and packed.warning():
    print(f"[sweep] warning: {packed.warning()}", flush=True)
  last_status = 0.0
  try:
    while todo or running:
      free = [s for s in slots if s not in running.values()]
      while todo and free:
        cell, slot = todo.pop(0), free.pop(0)
        env = dict(os.environ)
        if slot[0] is not None:
          env.update(CUDA_VISIBLE_DEVICES=slot[0], XLA_PYTHON_CLIENT_MEM_FRACTION=f"{packed.fraction:.3f}")
        log = sweeproot.log_path(root, cell.name).open("a")
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command(cell, recipe, budgets))}\n")
        log.flush()
        # a process group of its own: the sweep alone decides when a cell stops (stop_cells)
        proc = subprocess.Popen(command(cell, recipe, budgets), stdout=log, stderr=subprocess.STDOUT, env=env,
                                process_group=0)
        running[proc] = slot
        proc.cell, proc.log, proc.log_start = cell, log, log.tell()  # type: ignore[attr-defined]
      time.sleep(poll_s)
      for proc in [p for p in running if p.poll() is not None]:
        del running[proc]
        proc.log.close()
        if proc.returncode == 0 and proc.cell.done:
          finished_now += 1
          continue
        log_path = sweeproot.log_path(root, proc.cell.name)
        error = packing.gpu_error(attempt_log(log_path, proc.log_start)) if packed else None
        if error in packing.TRANSIENT_ERRORS and proc.cell.name not in retried:
          retried.add(proc.cell.name)
          todo.append(proc.cell)
          print(f"[sweep] {proc.cell.name} met {error!r} (exit {proc.returncode}); starting it once more", flush=True)
          continue
        failed.append(proc.cell)
        print(failure_line(proc.cell, proc.returncode, log_path, error, packed and packed.per_gpu,
                           proc.cell.name in retried), flush=True)
      if time.time() - last_status > 30 or not (todo or running):
        now = time.time()
        print(status_line(cells, len(running), len(todo), len(failed), now - start, eta(share_done(cells), now)),
              flush=True)
        last_status = now
  finally:
    stop_cells(list(running))
    for proc in running:
      proc.log.close()
    with (root / sweeproot.COST).open("a") as f:
      f.write(json.dumps({"time": time.time(), "wall_s": time.time() - start, "cells_run": finished_now,
                          "failed": len(failed), "failed_cells": [c.name for c in failed], "gpus": len(gpus),
                          "per_gpu": packed.per_gpu if packed else None}) + "\n")
  if latency and not failed and all(c.done for c in cells) and not sweeproot.latency_files(root):
    print("[sweep] measuring latency with the device to itself", flush=True)
    subprocess.run([sys.executable, "-m", "train.study.latency", str(root)], check=False)
  return len(failed)


def main(argv: list[str] | None = None) -> int:
  from fibjax.cli import ArgumentParser  # noqa: PLC0415  (this module imports nothing heavy at load)

  parser = ArgumentParser(description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", required=True, type=pathlib.Path)
  parser.add_argument("--config", default=None,
                      help="a recipe of configs (default: the one the root's sweeps ran, on a new root small)")
  parser.add_argument("--variants", nargs="+", default=None,
                      help="default: those the root's sweeps asked for (ROOT/sweep.json), on a new root all nine")
  parser.add_argument("--seeds", nargs="+", type=int, default=None,
                      help="default: those the root's sweeps asked for (ROOT/sweep.json), on a new root 0 1 2")
  add_overrides(parser, "recipe overrides for every cell")
  parser.add_argument("--per-gpu", type=int, default=None,
                      help="cells sharing one GPU (default: as many as its memory holds, at most "
                           f"{packing.DEFAULT_PER_GPU})")
  parser.add_argument("--budgets", nargs="*", default=None, help="sparsity budgets (default: all)")
  parser.add_argument("--no-latency", action="store_true", help="skip the closing latency measurement")
  parser.add_argument("--reruns", type=int, default=0,
                      help="train each variant this many more times at the first seed: the report sets the "
                           "spread of same-seed reruns beside the spread over seeds")
  parser.add_argument("--extend", action="store_true",
                      help="train the missing cells of a root of committed results (finished cells whose "
                           "checkpoints were not kept), which is otherwise refused; its finished cells stay as they are")
  parser.add_argument("--list", action="store_true",
                      help="train and write nothing: print one python -m train.experiment command per "
                           "unfinished cell")
  return run_command(sweep_and_report, parser, argv, interrupted=lambda args: (
      f"finished cells and the others' checkpoints are kept under {args.root}; run the same command again to resume"))


def sweep_and_report(args: argparse.Namespace) -> int:
  """Runs the sweep ``args`` describe; exit status 1 when a cell failed."""
  if args.per_gpu is not None and args.per_gpu < 1:
    raise ValueError(f"--per-gpu must be >= 1, got {args.per_gpu}")
  if args.reruns < 0:
    raise ValueError(f"--reruns must be >= 0, got {args.reruns}")
  args.config, args.set = asked_recipe(args.root, args.config, list(args.set))
  if args.list:
    commands = list_cells(args.root, args.config, args.variants, args.seeds, list(args.set), args.budgets,
                          args.reruns, extend=args.extend)
    if commands:
      print("\n".join(commands))
    else:
      print(f"[sweep] nothing left: every cell under {args.root} is finished; report: python -m train.report "
            f"{args.root}", file=sys.stderr)
    return 0
  failed = run_sweep(args.root, args.config, args.variants, args.seeds, list(args.set), args.per_gpu,
                     args.budgets, latency=not args.no_latency, reruns=args.reruns, extend=args.extend)
  if failed:
    print(f"[sweep] {failed} cell(s) failed; their logs are under {args.root / sweeproot.LOGS}; run again to retry "
          "them", file=sys.stderr)
    return 1
  print(f"[sweep] all cells done under {args.root}; report: python -m train.report {args.root}")
  return 0

if __name__ == "__main__":
  exit_with(main())
