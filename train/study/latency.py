"""Inference latency of a sweep's variants, measured alone, in one process on one device.

    python -m train.latency ROOT [--repeats 20] [--decode-tokens 64]

For one run of each variant under ``ROOT`` (the lowest seed): the forward pass at T and at 4T
(batch 1) and decoding per token after a prompt of T tokens (the bounded-cache decoder of
``fibjax.generate``, ``decode_impl`` as the run's config says). Each time is the median of
``--repeats`` synchronised runs after a warm-up. Run it when nothing else uses the device; the
sweep runs it after every training run has finished. ``--init`` times freshly initialised
parameters instead of the checkpoints (the time does not depend on their values). Writes ``ROOT/latency.json`` (an existing
file is kept and the new one written beside it with the next free number).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from fibjax.cli import ArgumentParser
from fibjax.generate import compiled_steps
from train.cli import check_writable, exit_with, run_command, write_whole
from train.run.mesh import make_mesh
from configs.base import TrainConfig
from fibjax.model import LM
from train.run import rundir
from train.run.restore import Run, load_run, tokenizer_of
from train.study import sweeproot
from train.study.sweep import check_one_recipe, read_run_config


def median_ms(fn: Callable[..., Any], repeats: int, setup: Callable[[], tuple] = tuple) -> float:
  """Median milliseconds of ``repeats`` synchronised calls of ``fn(*setup())``, after one warm-up
  call; ``setup`` (untimed) makes each call's arguments."""
  jax.block_until_ready(fn(*setup()))  # compile and warm up
  times = []
  for _ in range(repeats):
    args = jax.block_until_ready(setup())
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def measure(run: Run, repeats: int, decode_tokens: int) -> dict[str, float]:
  """Forward ms at T and 4T and decode ms per token for one restored run (batch 1)."""
  t = run.cfg.model.seq_len
  rng = np.random.default_rng(0)
  forward = jax.jit(lambda params, x: nnx.merge(run.graphdef, params)(x))
  out = {}
  for m in (1, 4):
    x = jnp.asarray(rng.integers(1, run.cfg.model.vocab_size, (1, m * t)), jnp.int32)
    out[f"forward_{m}x_ms"] = median_ms(lambda: forward(run.params, x), repeats)
  model = nnx.merge(run.graphdef, run.params)
  graphdef, state = nnx.split(model)
  prefill, steps = compiled_steps(graphdef, 0.0, 0)
  prompt = jnp.asarray(rng.integers(1, run.cfg.model.vocab_size, (1, t)), jnp.int32)
  key = jax.random.key(0)
  token, cache = prefill(state, prompt, model.init_cache(1, t + decode_tokens), key)

  def decode(cache) -> jax.Array:
    """Decodes ``decode_tokens`` tokens at positions ``T, T + 1, ...`` after the prompt, every call
    from the same cache (a fresh copy: the step donates it), so every call sees the same context."""
    return steps(state, token, jnp.int32(t), cache, key, decode_tokens)[0]

  def fresh_cache() -> tuple:
    return (jax.tree.map(jnp.copy, cache),)

  out["decode_ms_per_token"] = median_ms(decode, repeats, fresh_cache) / decode_tokens
  return out


def first_run_per_variant(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """``variant -> workdir`` of the lowest seed that holds a finished run (``eval.json``).

  Raises:
    ValueError: a finished run's ``config.json`` is not a fibjax config, or the finished runs under
      ``root`` are not one recipe (``train.study.sweep.check_one_recipe``), so their latencies would not
      compare like with like.
  """
  configs = {p.parent.name: read_run_config(p, root) for p in sorted(root.glob(f"*/{rundir.CONFIG}"))
             if rundir.is_finished(p.parent)}
  check_one_recipe(root, configs)
  found: dict[str, tuple[int, pathlib.Path]] = {}
  for name, cfg in configs.items():
    variant, seed = cfg["model"]["variant"], cfg["seed"]
    if variant not in found or seed < found[variant][0]:
      found[variant] = (seed, root / name)
  return {v: p for v, (_, p) in sorted(found.items())}


def no_runs_message(root: pathlib.Path) -> str:
  """Why ``root`` has no run to time: it is a run folder itself, or its folders hold no finished run."""
  run = sweeproot.not_a_root(root)
  if run:
    return run
  return (f"{root} holds no finished run (a folder with config.json and eval.json): give a sweep's root, after "
          "python -m train.sweep has finished its cells")


def initialised_run(workdir: pathlib.Path, mesh: Mesh) -> Run:
  """The run's model with freshly initialised parameters (its checkpoint is not read)."""
  cfg = TrainConfig.load(workdir / rundir.CONFIG).on_backend(jax.default_backend())  # as load_run reads it
  with jax.set_mesh(mesh):
    graphdef, params = nnx.split(LM(cfg.model, rngs=nnx.Rngs(cfg.seed)), nnx.Param)
  return Run(workdir, cfg, mesh, graphdef, params, 0, tokenizer_of(workdir, cfg))


def run_latency(root: pathlib.Path, repeats: int = 20, decode_tokens: int = 64,
                initialised: bool = False) -> tuple[pathlib.Path, dict]:
  """Measures every variant of ``root`` (see the module doc); the file is rewritten after each
  variant, so an interrupted measurement keeps the variants it finished."""
  runs = first_run_per_variant(root)
  if not runs:
    raise ValueError(no_runs_message(root))
  kept = [w.name for w in runs.values() if not rundir.saved_steps(w)]
  if kept and not initialised:
    raise ValueError(f"{root} keeps no checkpoint for {', '.join(kept)} (committed results): add --init to time freshly "
                     "initialised parameters (latency does not depend on the weights)")
  check_writable(root, "the sweep root")  # before measuring, not after
  record: dict[str, Any] = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                            "jax": jax.__version__, "repeats": repeats, "decode_tokens": decode_tokens,
                            "decode_context": "T",
                            "weights": "initialised" if initialised else "trained", "variants": {}}
  path = sweeproot.new_latency_path(root)
  mesh = make_mesh(devices=jax.devices()[:1])
  for variant, workdir in runs.items():
    run = initialised_run(workdir, mesh) if initialised else load_run(workdir, mesh=mesh)
    with jax.set_mesh(run.mesh):
      record["variants"][variant] = {"run": workdir.name, "seq_len": run.cfg.model.seq_len,
                                     **measure(run, repeats, decode_tokens)}
    print(f"{variant:>12}: " + "  ".join(f"{k} {v:.3f}" for k, v in record["variants"][variant].items()
                                         if k.endswith("ms") or k.endswith("token")), flush=True)
    write_whole(path, json.dumps(record, indent=2) + "\n")
  return path, record


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("root", type=pathlib.Path)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--decode-tokens", type=int, default=64)
  parser.add_argument("--init", action="store_true",
                      help="time freshly initialised parameters (no checkpoint needed: latency does not depend on them)")
  return run_command(measure_and_report, parser, argv,
                     interrupted=lambda args: "the variants measured before it, if any, are kept")


def measure_and_report(args: argparse.Namespace) -> int:
  """Measures the latency of every variant under ``ROOT`` and says where it is written."""
  if args.repeats < 1 or args.decode_tokens < 1:
    raise ValueError("--repeats and --decode-tokens must be >= 1")
  if not args.root.is_dir():
    raise ValueError(f"{args.root} is not a folder: give a sweep root (python -m train.sweep --root ...)")
  path, _ = run_latency(args.root, args.repeats, args.decode_tokens, args.init)
  print(f"wrote {path}")
  return 0

if __name__ == "__main__":
  exit_with(main())
