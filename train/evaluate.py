"""Held-out evaluation: perplexity at 1x/2x/4x the training length, loss by context position,
inference latency. ``python -m train.evaluate --workdir RUN`` restores the latest checkpoint."""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.base import TrainConfig
from train.data import eval_windows
from train.step import make_eval_step


def heldout_loss(eval_fn, params, windows: np.ndarray, rows: int, mesh) -> np.ndarray:
  """Mean NLL per position ``[L]`` over ``windows [n, L+1]``, ``rows`` windows per call."""
  total = np.zeros(windows.shape[1] - 1)
  ndev = mesh.devices.size
  for i in range(0, len(windows), rows):
    batch = windows[i : i + rows]
    spec = P(("data", "fsdp")) if len(batch) % ndev == 0 else P()
    total += np.asarray(eval_fn(params, jax.device_put(batch, NamedSharding(mesh, spec))))
  return total / len(windows)


def evaluate(graphdef, params, cfg: TrainConfig, heldout: np.ndarray, mesh) -> dict:
  """Perplexity at each of ``cfg.final_eval_multiples`` x T, bucketed loss, forward latency."""
  eval_fn = jax.jit(make_eval_step(graphdef))
  t = cfg.model.seq_len
  micro = cfg.batch_size // cfg.grad_accum
  out: dict = {"train_length": t, "eval_tokens": cfg.final_eval_tokens}
  for mult in cfg.final_eval_multiples:
    length = mult * t
    windows = eval_windows(heldout, length, cfg.final_eval_tokens)
    nll = heldout_loss(eval_fn, params, windows, max(1, micro // mult), mesh)
    buckets = np.array_split(nll, cfg.position_buckets)
    out[f"{mult}x"] = {
        "length": length, "windows": len(windows), "loss": float(nll.mean()), "ppl": float(math.exp(nll.mean())),
        "bucket_loss": [float(b.mean()) for b in buckets],
        "bucket_edges": [int(sum(len(x) for x in buckets[:i])) for i in range(len(buckets) + 1)],
    }
  one = jax.device_put(eval_windows(heldout, t, t)[:1], NamedSharding(mesh, P()))
  jax.block_until_ready(eval_fn(params, one))
  times = []
  for _ in range(10):
    start = time.perf_counter()
    jax.block_until_ready(eval_fn(params, one))
    times.append(time.perf_counter() - start)
  out["latency_ms_batch1"] = 1e3 * statistics.median(times)
  base = out[f"{cfg.final_eval_multiples[0]}x"]["ppl"]
  for mult in cfg.final_eval_multiples:
    out[f"{mult}x"]["ppl_rise_vs_1x"] = out[f"{mult}x"]["ppl"] / base - 1
  return out


def main() -> None:
  from train.trainer import load_run  # noqa: PLC0415

  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True, type=pathlib.Path)
  parser.add_argument("--tokens", type=int, default=None, help="held-out tokens per length (default: config's)")
  args = parser.parse_args()
  run = load_run(args.workdir)
  cfg = run.cfg if args.tokens is None else TrainConfig.from_dict({**run.cfg.to_dict(), "final_eval_tokens": args.tokens})
  with jax.set_mesh(run.mesh):
    result = evaluate(run.graphdef, run.params, cfg, run.heldout, run.mesh)
  result["step"] = run.step
  path = args.workdir / "eval.json"
  path.write_text(json.dumps(result, indent=2) + "\n")
  for mult in cfg.final_eval_multiples:
    r = result[f"{mult}x"]
    print(f"{mult}x T={r['length']}: loss {r['loss']:.4f} ppl {r['ppl']:.3f} ({100 * r['ppl_rise_vs_1x']:+.1f}%)")
  print(f"latency {result['latency_ms_batch1']:.2f} ms (batch 1, length T); wrote {path}")


if __name__ == "__main__":
  main()
