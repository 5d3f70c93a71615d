"""FlexAttention (torch) with the fibjax benchmark's own mask, timed on one GPU; prints one JSON line.

    python -m benchmarks.flex_peer --n 4096 16384 65536 --shapes 8,8,64 8,2,64 --window 64 --offsets 64,89,144

Prints the cumulative results as one JSON line after every measurement (the last line has them all).
Run in a process of its own (``benchmarks.attention`` starts it before JAX touches the GPU), with
a compiled block mask (``create_block_mask(..., _compile=True)``) built from the same pattern:
query ``i`` sees key ``j`` iff ``0 <= i - j < window`` or ``i - j`` is one of ``offsets``. Shapes
are ``heads,kv_heads,head_dim`` (grouped-query through ``enable_gqa``); bf16, batch 1.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Callable

import torch
import torch._dynamo
import triton.testing
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

if TYPE_CHECKING:
  from torch.nn.attention.flex_attention import BlockMask


def _mask_mod(window: int, offsets: list[int]) -> Callable[..., torch.Tensor]:
  """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``: ``q_idx`` sees ``kv_idx``
  inside the causal window or at one of ``offsets``."""

  def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    d = q - kv
    hit = (d >= 0) & (d < window)
    for o in offsets:
      hit = hit | (d == o)
    return hit

  return mask_mod


def _allow_recompiles(limit: int = 64) -> None:
  """One compiled kernel per (shape, length): keep dynamo from falling back to eager mode."""
  for name in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, name):  # noqa: SLF001  (the documented knob; its name changed across torch versions)
      setattr(torch._dynamo.config, name, limit)  # noqa: SLF001


def time_shape(flex: Callable[..., torch.Tensor], mask: BlockMask, n: int, heads: int, kv_heads: int,
               head_dim: int) -> dict:
  """Median ms of forward and forward+backward at one shape: ``q [1, heads, n, head_dim]``, ``k, v
  [1, kv_heads, n, head_dim]``, bf16, random."""
  def rand(h: int) -> torch.Tensor:
    return torch.randn(1, h, n, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)

  q, k, v = rand(heads), rand(kv_heads), rand(kv_heads)
  gqa = kv_heads != heads
  fwd = triton.testing.do_bench(lambda: flex(q, k, v, block_mask=mask, enable_gqa=gqa), warmup=50, rep=300,
                                return_mode="median")
  g = torch.randn_like(q)

  def fwd_bwd() -> None:
    out = flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    torch.autograd.grad(out, (q, k, v), g)

  return {"fwd_ms": fwd, "fwd_bwd_ms": triton.testing.do_bench(fwd_bwd, warmup=50, rep=300, return_mode="median")}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--n", type=int, nargs="+", required=True)
  parser.add_argument("--shapes", nargs="+", default=["8,8,64"], help="heads,kv_heads,head_dim")
  parser.add_argument("--window", type=int, required=True)
  parser.add_argument("--offsets", required=True, help="comma-separated static offsets")
  args = parser.parse_args()
  offsets = [int(o) for o in args.offsets.split(",") if o]
  _allow_recompiles()
  flex = torch.compile(flex_attention, dynamic=False)
  res = {"torch": torch.__version__, "offsets": offsets, "window": args.window, "sizes": {}}
  masks = {}
  for shape in args.shapes:  # the first shape at every length before the next shape
    heads, kv_heads, head_dim = map(int, shape.split(","))
    for n in args.n:
      if n not in masks:
        masks[n] = create_block_mask(_mask_mod(args.window, offsets), None, None, n, n, device="cuda", _compile=True)
      try:
        res["sizes"].setdefault(shape, {})[str(n)] = time_shape(flex, masks[n], n, heads, kv_heads, head_dim)
      except Exception as e:  # noqa: BLE001  (reported in the results, not hidden)
        res["sizes"].setdefault(shape, {})[str(n)] = {"error": str(e).splitlines()[0][:200]}
      torch.cuda.empty_cache()
      print(json.dumps(res), flush=True)  # cumulative: a caller that stops us early keeps what was measured


if __name__ == "__main__":
  main()
