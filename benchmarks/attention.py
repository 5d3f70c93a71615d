"""Attention benchmark: the fibjax Pallas kernel against its peers, one run, one GPU.

    python benchmarks/attention.py [--n 4096 16384 65536] [--out benchmarks/results]

Times forward and forward+backward (after warm-up, synchronised, median of many, random bf16
data rotated over input sets) of: the kernel with static offsets and with learned (fractional)
alpha; cuDNN dense causal attention; cuDNN local window only; the XLA reference; and, if torch
is importable, FlexAttention with the same mask (in a subprocess). Measures copy bandwidth in
the same run and reports each kernel's time against the memory floor of SPEC section 4 (bytes of
Q and O once plus K and V once per offset and once for the window, over copy bandwidth), and
every ratio. Writes ``attention_<device>.md`` and ``.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import fibjax  # noqa: E402
from benchmarks.timing import copy_bandwidth, time_fn  # noqa: E402

B, H, D, W, R, ALPHA = 1, 8, 64, 64, 4096, 1.0


def make_inputs(n: int, sets: int, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), sets)
  return [tuple(jax.random.normal(kk, (3, B, n, H, D), jnp.bfloat16)) for kk in keys]


def fwd_bwd(f):
  """``(q, k, v) -> grads`` of ``sum(f(q, k, v) * w)`` for a fixed random cotangent."""

  def loss(q, k, v):
    return jnp.sum(f(q, k, v).astype(jnp.float32) * jnp.cos(q.astype(jnp.float32)))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def variants(n: int, block: int, num_warps: int):
  static = jnp.asarray(fibjax.offset_set("fib", ALPHA, W, R), jnp.int32)
  terms = jnp.asarray(fibjax.learned_terms("fib", ALPHA, W, R), jnp.float32)
  # alpha slightly off an integer grid so every term really blends two rows
  learned = terms * jnp.float32(ALPHA + 1e-3)
  opts = dict(block=block, num_warps=num_warps)
  return {
      "fib static": lambda q, k, v: fibjax.attention(q, k, v, window=W, offsets=static, reach=R, implementation="pallas", **opts),
      "fib learned": lambda q, k, v: fibjax.attention(q, k, v, window=W, offsets=learned, reach=R, implementation="pallas", **opts),
      "cuDNN dense causal": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
      "cuDNN window only": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, local_window_size=(W - 1, 0), implementation="cudnn"),
      "XLA reference": lambda q, k, v: fibjax.attention(q, k, v, window=W, offsets=static, reach=R, implementation="reference"),
  }, int(static.shape[0])


def check(n: int, block: int, num_warps: int) -> dict:
  """Kernel vs the reference computed in float32 from the same bf16 inputs (fresh random data)."""
  q, k, v = make_inputs(n, 1, seed=1234 + n)[0]
  fs, _ = variants(n, block, num_warps)
  ref = jax.jit(lambda q, k, v: fibjax.attention(*(x.astype(jnp.float32) for x in (q, k, v)), window=W,
                                                 offsets=fibjax.offset_set("fib", ALPHA, W, R), reach=R,
                                                 implementation="reference"))(q, k, v)
  out = jax.jit(fs["fib static"])(q, k, v).astype(jnp.float32)
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  return {"rel_err_vs_f32_reference": rel, "finite": bool(jnp.isfinite(out).all())}


def floor_ms(n: int, num_offsets: int, bandwidth: float) -> dict:
  tensor = B * n * H * D * 2  # bf16 bytes of one of q, k, v, o
  fwd = 2 * tensor + 2 * tensor * (num_offsets + 1)
  # backward: dQ pass reads q, do, K/V per term, writes dq; dK/dV pass reads k, v, q/do per term, writes dk, dv
  bwd = 3 * tensor + 2 * tensor * (num_offsets + 1) + 4 * tensor + 2 * tensor * (num_offsets + 1)
  return {"fwd": 1e3 * fwd / bandwidth, "fwd_bwd": 1e3 * (fwd + bwd) / bandwidth, "fwd_bytes": fwd}


def flex_peer(ns: list[int]) -> dict:
  script = pathlib.Path(__file__).with_name("flex_peer.py")
  try:
    res = subprocess.run([sys.executable, str(script), *map(str, ns)], capture_output=True, text=True, timeout=900)
    return json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {"error": res.stderr[-500:]}
  except Exception as e:  # noqa: BLE001  (peer is optional: report why it is missing)
    return {"error": repr(e)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
  parser.add_argument("--block", type=int, default=64)
  parser.add_argument("--num-warps", type=int, default=4)
  parser.add_argument("--reps", type=int, default=30)
  parser.add_argument("--no-flex", action="store_true")
  parser.add_argument("--rewrite", type=pathlib.Path, help="only re-render the markdown of this results JSON")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
  args = parser.parse_args()
  if args.rewrite:
    return write(json.loads(args.rewrite.read_text()), args.out)
  device = jax.devices()[0].device_kind
  bw = copy_bandwidth()
  print(f"{device}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
  results = {"device": device, "jax": jax.__version__, "copy_bandwidth_Bps": bw, "date": time.strftime("%Y-%m-%d"),
             "config": dict(B=B, H=H, D=D, W=W, R=R, alpha=ALPHA, dtype="bfloat16", block=args.block,
                            num_warps=args.num_warps), "sizes": {}}
  for n in args.n:
    fs, num_offsets = variants(n, args.block, args.num_warps)
    sets = make_inputs(n, max(2, min(8, (256 << 20) // (3 * B * n * H * D * 2))))
    row = {"num_offsets": num_offsets, "check": check(n, args.block, args.num_warps),
           "floor_ms": floor_ms(n, num_offsets, bw), "fwd_ms": {}, "fwd_bwd_ms": {}}
    for name, f in fs.items():
      for kind, fn in (("fwd_ms", jax.jit(f)), ("fwd_bwd_ms", fwd_bwd(f))):
        try:
          row[kind][name] = time_fn(fn, sets, reps=args.reps)
        except Exception as e:  # noqa: BLE001  (OOM or unsupported: reported, not hidden)
          row[kind][name] = None
          row.setdefault("errors", {})[f"{name} {kind}"] = str(e).splitlines()[0][:200]
      print(n, name, {k: row[k].get(name) for k in ("fwd_ms", "fwd_bwd_ms")}, flush=True)
    results["sizes"][str(n)] = row
  if not args.no_flex:
    results["flex"] = flex_peer(args.n)
  write(results, args.out)


def _ratio(a, b):
  return f"{a / b:.2f}x" if a and b else "n/a"


def write(results: dict, out: pathlib.Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  tag = results["device"].replace(" ", "_")
  (out / f"attention_{tag}.json").write_text(json.dumps(results, indent=2) + "\n")
  lines = [f"# Attention benchmark on {results['device']} ({results['date']}, jax {results['jax']})", "",
           f"Config: {results['config']}. Copy bandwidth {results['copy_bandwidth_Bps'] / 1e12:.2f} TB/s "
           "(read + write). Times: median ms. Reproduce: `python benchmarks/attention.py`.", ""]
  flex = results.get("flex", {})
  for n, row in results["sizes"].items():
    f, fb, floor = row["fwd_ms"], row["fwd_bwd_ms"], row["floor_ms"]
    lines += [f"## N = {n} (K = {row['num_offsets']} offsets; kernel rel. error vs f32 reference "
              f"{row['check']['rel_err_vs_f32_reference']:.2e})", "",
              "| implementation | fwd ms | fwd+bwd ms | fwd vs kernel | fwd+bwd vs kernel |", "|---|---|---|---|---|"]
    peers = dict(f)
    if "fwd_ms" in flex.get("sizes", {}).get(str(n), {}):
      peers["FlexAttention (torch)"] = flex["sizes"][str(n)].get("fwd_ms")
      fb = dict(fb, **{"FlexAttention (torch)": flex["sizes"][str(n)].get("fwd_bwd_ms")})
    for name in peers:
      a, b = peers[name], fb.get(name)
      lines.append(f"| {name} | {a and f'{a:.3f}'} | {b and f'{b:.3f}'} | {_ratio(a, f['fib static'])} | "
                   f"{_ratio(b, fb['fib static'])} |")
    lines += ["", f"Memory floor (fwd): {floor['fwd']:.3f} ms -> kernel at {_ratio(f['fib static'], floor['fwd'])} "
              f"of the floor; fwd+bwd floor {floor['fwd_bwd']:.3f} ms -> "
              f"{_ratio(fb['fib static'], floor['fwd_bwd'])}. Learned/static: fwd "
              f"{_ratio(f['fib learned'], f['fib static'])}, fwd+bwd {_ratio(fb['fib learned'], fb['fib static'])}.", ""]
    for k, e in row.get("errors", {}).items():
      lines.append(f"- {k}: {e}")
    if "error" in flex.get("sizes", {}).get(str(n), {}):
      lines.append(f"- FlexAttention: {flex['sizes'][str(n)]['error']}")
  if "error" in flex:
    lines.append(f"FlexAttention peer not measured: {flex['error'][:300]}")
  (out / f"attention_{tag}.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
