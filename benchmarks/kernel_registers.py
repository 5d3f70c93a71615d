"""Registers and spills of the GPU attention kernels, on any machine (no GPU needed).

    pip install --target /tmp/triton triton          # a Triton build with its ptxas; not a dependency
    python -m benchmarks.kernel_registers --triton /tmp/triton [--head-dims 64 128] [--kv-heads 8 2] [--defaults]

Lowers the forward, dQ and dK/dV kernels through Pallas' Triton rules for a CUDA target (as the
GPU does; N = 65536, 8 query heads, W = 64, R = 4096, K = 8, bf16) for each head_dim, key/value head
count, static or learned offsets and form of offset terms (row-wise or tensor cores), captures each
Triton module, compiles it for sm_90a with the separately installed Triton (on the warps its
configuration gives it, 2 stages) and reads ``ptxas -v``: registers per thread, stack frame and
spill bytes. Each form is its shape's default configuration with the term form replaced, on 4
warps (``form_configs``); the dK/dV kernel's group is unrolled unless ``--loop-group`` (the kernels
loop over it by default). With ``--defaults`` each shape is lowered once in its default
configuration (per pass: term form and flow, saved term probabilities, group loop, tile rows,
warps): the kernels the GPU runs by default.
The installed Triton is not the compiler inside jaxlib, so the counts show which kernels are
short of registers, not the exact figures of the GPU build. Writes
``kernel_registers[_defaults][_loop_group][_block_bwd<B>].json`` under ``--out`` (refuses to overwrite
it unless ``--force``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp

from fibjax.cli import ArgumentParser
from benchmarks.attention import H, R, W, static_offsets
from benchmarks.cli import add_force, at_least, claim, fail, out_folder
from pallas_kernels.attention.config import (UNBRANCHED_BACKWARD_MAX_HEAD_DIM, BackwardConfig, ForwardConfig,
                                             default_backward, default_forward)
from pallas_kernels.attention.ops import attention_problem

N = 65536
OFFSETS = static_offsets()  # benchmarks.attention's static offsets (K = 8 at W = 64, R = 4096)
KERNELS = ("fwd", "dq", "dkdv")

_COMPILE = r"""
import pathlib, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ptxas = next(p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists())
for arg in sys.argv[1:]:
  path, warps = arg.rsplit("=", 1)
  kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32), options={"num_warps": int(warps), "num_stages": 2})
  ptx = pathlib.Path(path).with_suffix(".ptx")
  ptx.write_text(kernel.asm["ptx"])
  res = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", "/dev/null"], capture_output=True, text=True)
  print(path, "|", " ".join(res.stderr.split()), flush=True)
"""


def _shapes(head_dim: int, kv_heads: int,
            learned: bool) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct, jax.Array]:
  """``q [1, N, H, head_dim]``, ``k, v [1, N, kv_heads, head_dim]`` (bf16) and the offsets."""
  offsets = (jnp.asarray(OFFSETS, jnp.float32) * 1.001) if learned else jnp.asarray(OFFSETS, jnp.int32)
  q = jax.ShapeDtypeStruct((1, N, H, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, N, kv_heads, head_dim), jnp.bfloat16)
  return q, kv, offsets


def default_configs(head_dim: int, kv_heads: int, learned: bool) -> tuple[ForwardConfig, BackwardConfig]:
  """The heuristic's configuration of each pass at this shape on a GPU."""
  q, kv, offsets = _shapes(head_dim, kv_heads, learned)
  problem = attention_problem(q, kv, offsets, window=W, reach=R, backend="gpu")
  return default_forward(problem), default_backward(problem)


def lowered_kernels(head_dim: int, kv_heads: int, learned: bool, config: ForwardConfig | None = None,
                    config_bwd: BackwardConfig | None = None) -> list[tuple[str, int]]:
  """The three kernels' Triton modules (text) and the warps the lowering gives each, from lowering
  ``jax.grad`` of the kernel for CUDA at ``q [1, N, H, head_dim]``, ``k, v [1, N, kv_heads,
  head_dim]``, bf16 (shapes only: nothing runs), each pass in ``config``/``config_bwd`` (``None``:
  the kernels' default)."""
  from jax._src.pallas.triton import pallas_call_registration  # noqa: PLC0415  (the lowering's entry point)

  from pallas_kernels import gathered_offset_attention  # noqa: PLC0415

  modules = {}
  lowering = pallas_call_registration.lowering
  lower = lowering.lower_jaxpr_to_triton_module

  def capture(*args: Any, **kwargs: Any) -> Any:
    result = lower(*args, **kwargs)
    text = result.module.operation.get_asm()
    modules[re.search(r"module @fib_attention_(\w+)", text).group(1)] = text
    return result

  q, kv, offsets = _shapes(head_dim, kv_heads, learned)

  def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    out = gathered_offset_attention(q, k, v, window=W, offsets=offsets, reach=R, backend="gpu", config=config,
                                    config_bwd=config_bwd)
    return jnp.sum(out.astype(jnp.float32))

  default_backend = jax.default_backend
  lowering.lower_jaxpr_to_triton_module, jax.default_backend = capture, lambda: "gpu"
  try:
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  finally:
    lowering.lower_jaxpr_to_triton_module, jax.default_backend = lower, default_backend
  warps = dict(re.findall(r'name = "fib_attention_(\w+)", num_stages = \d+ : i32, num_warps = (\d+)', text))
  if sorted(modules) != sorted(KERNELS) or sorted(warps) != sorted(KERNELS):
    raise RuntimeError(f"expected the kernels {KERNELS}, lowered {sorted(modules)} with warps {warps}")
  return [(modules[k], int(warps[k])) for k in KERNELS]


def form_configs(head_dim: int, kv_heads: int, learned: bool, term_mma: bool, loop_group: bool,
                 block_bwd: int | None = None) -> tuple[ForwardConfig, BackwardConfig]:
  """Each pass's default configuration at this shape with the offset terms in one form, 4 warps, the
  dK/dV group looped or unrolled, and ``block_bwd`` backward rows (``None``: the default). In the
  backward, row-wise terms run unbranched up to ``UNBRANCHED_BACKWARD_MAX_HEAD_DIM`` and tensor-core
  ones branched, as the heuristic runs each form at this N (16 reaches)."""
  fwd, bwd = default_configs(head_dim, kv_heads, learned)
  unbranched = not term_mma and head_dim <= UNBRANCHED_BACKWARD_MAX_HEAD_DIM
  return (dataclasses.replace(fwd, term_mma=term_mma, num_warps=4),
          dataclasses.replace(bwd, term_mma=term_mma, term_flow="unbranched" if unbranched else "branched",
                              loop_group=loop_group, num_warps=4, block=block_bwd or bwd.block))


def triton_modules(*args: Any, **kwargs: Any) -> list[str]:
  """The three kernels' Triton modules (text) from ``lowered_kernels(*args, **kwargs)``."""
  return [text for text, _ in lowered_kernels(*args, **kwargs)]


def parse(report: str) -> dict:
  """Registers per thread, stack frame and spill bytes from one kernel's ``ptxas -v`` report (``None``
  where the report does not say)."""

  def number(pattern: str) -> int | None:
    m = re.search(pattern, report)
    return int(m.group(1)) if m else None

  return {"registers": number(r"Used (\d+) registers"), "stack_bytes": number(r"(\d+) bytes stack frame"),
          "spill_store_bytes": number(r"(\d+) bytes spill stores"), "spill_load_bytes": number(r"(\d+) bytes spill loads")}


def main(argv: list[str] | None = None) -> None:
  parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--triton", type=pathlib.Path, required=True, help="folder a Triton package is installed in")
  parser.add_argument("--head-dims", type=at_least(16, "--head-dims"), nargs="+", default=[64, 128])
  parser.add_argument("--kv-heads", type=at_least(1, "--kv-heads"), nargs="+", default=[8, 2])
  parser.add_argument("--loop-group", action="store_true", help="dK/dV loops over the group's query heads (the GPU default with groups; without it: unrolled)")
  parser.add_argument("--block-bwd", type=at_least(16, "--block-bwd"),
                      help="rows per backward tile (default: the kernels' default)")
  parser.add_argument("--defaults", action="store_true",
                      help="each shape in its default configuration, each kernel on its pass's default warps")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
  add_force(parser)
  args = parser.parse_args(argv)
  if not (args.triton / "triton").is_dir():
    fail(f"no triton package in {args.triton}; install one with pip install --target {args.triton} triton")
  powers = args.head_dims + ([args.block_bwd] if args.block_bwd is not None else [])
  bad = [x for x in powers if x & (x - 1)] + [h for h in args.kv_heads if H % h]
  if bad:
    fail(f"head dims and --block-bwd must be powers of 2 >= 16 and kv heads must divide {H}, got {bad}")
  if args.defaults and (args.loop_group or args.block_bwd):
    fail("--defaults takes every option at its default; leave out --loop-group and --block-bwd")
  tag = (("_defaults" if args.defaults else "") + ("_loop_group" if args.loop_group else "")
         + (f"_block_bwd{args.block_bwd}" if args.block_bwd else ""))
  out_folder(args.out)
  results = args.out / f"kernel_registers{tag}.json"
  claim([results], args.force)
  forms = (None,) if args.defaults else (False, True)
  with tempfile.TemporaryDirectory() as tmp:
    paths = {}
    for d, h_kv, learned, mma in itertools.product(args.head_dims, args.kv_heads, (False, True), forms):
      loop_group = None if args.defaults else args.loop_group
      configs = () if mma is None else form_configs(d, h_kv, learned, mma, args.loop_group, args.block_bwd)
      form = {None: "default", True: "mma", False: "row"}[mma]
      for kernel, (text, num_warps) in zip(KERNELS, lowered_kernels(d, h_kv, learned, *configs)):
        path = pathlib.Path(tmp) / f"d{d}_kv{h_kv}_{'learned' if learned else 'static'}_{form}_{kernel}.ttir"
        path.write_text(text)
        paths[str(path)] = dict(head_dim=d, kv_heads=h_kv, learned=learned, term_mma=form if mma is None else mma,
                                kernel=kernel, loop_group=loop_group, block_bwd=args.block_bwd,
                                num_warps=num_warps)
    env = dict(os.environ, PYTHONPATH=str(args.triton.resolve()), TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", _COMPILE, *(f"{p}={row['num_warps']}" for p, row in paths.items())],
                         capture_output=True, text=True, env=env)
    if res.returncode:
      print(f"error: the Triton compile failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
      sys.exit(1)
    rows = []
    for line in res.stdout.splitlines():
      path, _, report = line.partition(" | ")
      rows.append(dict(paths[path], **parse(report)))
  results.write_text(json.dumps({"jax": jax.__version__, "rows": rows}, indent=2) + "\n")
  print("| head_dim | kv heads | offsets | terms | kernel | warps | registers | stack B | spill stores / loads B |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    terms = {"default": "defaults", True: "tensor cores", False: "row-wise"}[r["term_mma"]]
    print(f"| {r['head_dim']} | {r['kv_heads']} | {'learned' if r['learned'] else 'static'} | {terms} | {r['kernel']} | "
          f"{r['num_warps']} | {r['registers']} | {r['stack_bytes']} | {r['spill_store_bytes']} / {r['spill_load_bytes']} |")


if __name__ == "__main__":
  main()
