"""Sweep of the three fused decode kernels (``pallas_kernels/decode_block.py``) against XLA doing the
same math, at the paper recipe's shapes (bf16, d_model 512, 8 heads of 64, mlp 1664, R = 4096).

    python -m benchmarks.tune_decode [--batches 1 32] [--out DIR] [--force]

Kernel time comes from a profiler trace (``benchmarks.timing.kernel_times``: execution only,
launch gaps excluded); the XLA peer's time is the sum of all its kernels, with their count.
The weight-read floor is the bytes of the weights at the copy bandwidth measured in the same run.
Writes ``tune_decode_<device>.json`` (refuses to overwrite it unless ``--force``).
"""

from __future__ import annotations

import itertools
import json
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from fibjax.cli import ArgumentParser
import fibjax
from benchmarks.cli import add_force, at_least, claim, device_kind, out_folder, require_gpu
from benchmarks.timing import copy_bandwidth, kernel_times
from fibjax import decode as dec
from fibjax.layers import rope, rope_angles
from fibjax.reference import normalize_offsets
from pallas_kernels.decode.attention import sparse_attention
from pallas_kernels.decode.projections import Rope, project

D, H, HD, M, R = 512, 8, 64, 1664, 4096
BF = jnp.bfloat16
LAYERS = 16  # caches cycled through, as in the decode loop's 16 layers
HBM_BYTES = 128 << 20  # weight copies cycled through: > 2x the L2, so weights come from HBM, as in the decode loop


def _copies(nbytes: int) -> int:
  """Copies of an ``nbytes`` weight to cycle through: one per layer, or as many as fill ``HBM_BYTES``."""
  return max(LAYERS, -(-HBM_BYTES // nbytes))


def _cycling(f: Callable, arg_sets: Sequence[tuple]) -> Callable[[], Any]:
  """``run()`` calling ``f`` on the next of ``arg_sets`` each time."""
  box = {"i": 0}

  def run() -> Any:
    box["i"] += 1
    return f(*arg_sets[box["i"] % len(arg_sets)])

  return run


def _rms(x: jax.Array, scale: jax.Array) -> jax.Array:
  """RMSNorm of ``x [B, D]`` (float32 statistics) times ``scale [D]``, in bf16."""
  x = x.astype(jnp.float32)
  return (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale).astype(BF)


def _residuals(b: int) -> tuple[jax.Array, jax.Array]:
  """Two random float32 residual streams ``[b, D]``."""
  return tuple(jax.random.normal(jax.random.key(9 + i), (b, D), jnp.float32) for i in range(2))


def shapes(b: int) -> dict[str, tuple[Callable, Callable, list[tuple]]]:
  """name -> (kernel(x, w, aux, **config), XLA peer(x, w, aux), [args per layer]): the projection kernels.
  ``x [b, D]`` float32 (the residual stream), ``w`` bf16 ``[D, 3 D]`` (qkv) or ``[D, 2 M]`` (mlp gate and
  up), ``aux`` ``None`` (qkv) or the bf16 down projection ``[M, D]`` (mlp)."""
  rnd = lambda *s: jax.random.normal(jax.random.key(len(s) * 1000 + s[-1]), s, BF)  # noqa: E731
  copies = lambda *s: [jax.random.normal(jax.random.key(i), s, BF) for i in range(_copies(2 * s[0] * s[1]))]  # noqa: E731
  scale = jnp.ones((D,), jnp.float32)
  pos = jnp.int32(5000)
  angle = rope_angles(pos, HD, 10_000.0)

  def xla_qkv(x: jax.Array, w: jax.Array, _: None) -> tuple[jax.Array, jax.Array]:
    """``(qkv [b, 1, 3, H, HD] bf16 with q and k rotated, x)``."""
    qkv = jnp.dot(_rms(x, scale), w).reshape(b, 1, 3, H, HD)
    p = jnp.full((b, 1), pos)
    return jnp.stack([rope(qkv[:, :, 0], p, 1e4), rope(qkv[:, :, 1], p, 1e4), qkv[:, :, 2]], 2), x

  def xla_mlp(x: jax.Array, w: jax.Array, down: jax.Array) -> jax.Array:
    """``x + down(swiglu(rms(x) @ w))``, float32 ``[b, D]``."""
    g, u = jnp.split(jnp.dot(_rms(x, scale), w), 2, -1)
    return x + jnp.dot(jax.nn.silu(g) * u, down)

  return {
      "qkv (norm, rope, copy)": (
          lambda x, w, _, **c: project(x, w, norm_scale=scale, rope=Rope(jnp.cos(angle), jnp.sin(angle), HD, 2 * D),
                                       copy_input=True, **c),
          xla_qkv, [(rnd(b, D).astype(jnp.float32), w, None) for w in copies(D, 3 * D)]),
      "mlp (norm, swiglu, down)": (
          lambda x, w, down, **c: project(x, w, norm_scale=scale, swiglu=True, down=down, into=x, **c),
          xla_mlp, [(rnd(b, D).astype(jnp.float32), w, down) for w, down in zip(copies(D, 2 * M), copies(M, D))]),
  }


def attention_rows(b: int) -> list[dict]:
  """The sparse attention kernel with the out projection fused in, against XLA doing the same
  (cache write, gather attention, out projection, residual add). Inputs: ``qkv [b, 3, H, HD]`` bf16
  (the new token's q, k, v), per-layer bf16 caches ``k, v [b, R + 1, H, HD]``, two float32 residual
  streams ``[b, D]``, ``wo [H * HD, D]`` bf16."""
  key = iter(jax.random.split(jax.random.key(1), 2 * LAYERS + 1))
  caches = [{n: jax.random.normal(next(key), (b, R + 1, H, HD), BF) for n in ("k", "v")} for _ in range(LAYERS)]
  qkv = jax.random.normal(next(key), (b, 3, H, HD), BF)
  wos = [jax.random.normal(jax.random.key(i), (H * HD, D), BF) for i in range(_copies(2 * H * HD * D))]
  offsets = jnp.asarray(fibjax.offset_set("fib", 1.0, 64, R), jnp.int32)
  offs, _ = normalize_offsets(offsets, 64, R)
  pos = jnp.int32(10_000)
  rows = []

  def timed(fn: Callable) -> dict[str, float]:
    """Kernel ms per call of ``fn(qkv, cache, residuals, wo) -> (residuals, cache)`` by kernel name;
    per-layer caches and residuals donated and threaded through, as in the decode loop."""
    f = jax.jit(fn, donate_argnums=(1, 2))
    box = {"i": 0, "res": _residuals(b)}

    def run() -> tuple[jax.Array, jax.Array]:
      i = box["i"] = box["i"] + 1
      box["res"], caches[i % LAYERS] = f(qkv, caches[i % LAYERS], box["res"], wos[i % len(wos)])
      return box["res"]

    return kernel_times(run, len(wos))

  for splits, warps in itertools.product((1, 2, 4, 8), (2, 4, 8)):
    t = timed(lambda q, c, r, wo, w=warps, s=splits: sparse_attention(
        q, c, offs, pos, window=64, scale=0.125, out_weight=wo, residuals=r, out_splits=s, num_warps=w))
    rows.append({"shape": "attention + out", "batch": b, "out_splits": splits, "num_warps": warps,
                 "kernel_ms": sum(t.values()), "kernels": sorted(t)})
    print(json.dumps(rows[-1]), flush=True)

  def xla(q: jax.Array, c: dict[str, jax.Array], r: tuple[jax.Array, jax.Array],
          wo: jax.Array) -> tuple[tuple[jax.Array, jax.Array], dict[str, jax.Array]]:
    c = dec.write_token(c, q[:, 1], q[:, 2], pos)
    o = dec.attend_sparse(q[:, 0], c, pos, window=64, offsets=offsets, reach=R, scale=0.125).astype(BF)
    out = jnp.dot(o.reshape(b, H * HD), wo).astype(jnp.float32)
    return (r[0] + out, r[1] + out), c

  t = timed(xla)
  rows.append({"shape": "attention + out", "batch": b, "xla_ms": sum(t.values()), "xla_kernels": len(t)})
  return rows


def main(argv: list[str] | None = None) -> None:
  parser = ArgumentParser(description=__doc__)
  parser.add_argument("--batches", type=at_least(1, "--batches", "batch sizes"), nargs="+", default=[1, 32])
  parser.add_argument("--parts", nargs="+", default=["projections", "attention"], choices=["projections", "attention"])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
  add_force(parser)
  args = parser.parse_args(argv)
  out_folder(args.out)
  device = device_kind()
  path = args.out / f"tune_decode_{device.replace(' ', '_')}.json"
  claim([path], args.force)
  require_gpu("benchmarks.tune_decode times GPU kernels")
  bandwidth = copy_bandwidth()
  rows = []
  for b in args.batches:
    for name, (kern, xla, data) in shapes(b).items() if "projections" in args.parts else ():
      floor_ms = 1e3 * (data[0][1].nbytes + (data[0][2].nbytes if data[0][2] is not None else 0)) / bandwidth
      t = kernel_times(_cycling(jax.jit(xla), data), len(data))
      peer = {"shape": name, "batch": b, "xla_ms": sum(t.values()), "xla_kernels": len(t), "floor_ms": floor_ms}
      print(json.dumps(peer), flush=True)
      rows.append(peer)
      configs = [dict(block_cols=c, chunk=None, num_warps=w, num_stages=1)
                 for c, w in itertools.product((16, 32, 64), (2, 4, 8))]
      configs += [dict(block_cols=c, chunk=k, num_warps=w, num_stages=st)
                  for c, k, w, st in itertools.product((16, 32), (128, 256), (4, 8), (2, 3, 4))]
      for config in configs:
        try:
          f = jax.jit(lambda x, w, a, c=config: kern(x, w, a, **c))
          t = kernel_times(_cycling(f, data), len(data))  # the mlp's ``into`` (x) is copied first: not counted
          ms = sum(v for name, v in t.items() if "decode_" in name)
        except Exception as e:  # noqa: BLE001  (a configuration that does not compile is reported)
          ms, config = None, dict(config, error=str(e).splitlines()[0][:120])
        rows.append({"shape": name, "batch": b, **config, "kernel_ms": ms})
        print(json.dumps(rows[-1]), flush=True)
    for row in attention_rows(b) if "attention" in args.parts else ():
      rows.append(row)
      print(json.dumps(row), flush=True)
  path.write_text(
      json.dumps({"device": device, "copy_bandwidth": bandwidth, "rows": rows}, indent=2) + "\n")
  for b in args.batches:
    for name in dict.fromkeys(r["shape"] for r in rows if r["batch"] == b):
      mine = [r for r in rows if r["shape"] == name and r["batch"] == b and r.get("kernel_ms")]
      peer = next(r for r in rows if r["shape"] == name and r["batch"] == b and "xla_ms" in r)
      best = min(mine, key=lambda r: r["kernel_ms"]) if mine else None
      print(f"B={b} {name}: xla {peer['xla_ms'] * 1e3:.1f} us in {peer['xla_kernels']} kernels; best pallas "
            f"{best and best['kernel_ms'] * 1e3:.1f} us {best}; floor {peer.get('floor_ms', 0) * 1e3:.1f} us")


if __name__ == "__main__":
  main()
