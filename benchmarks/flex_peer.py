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
import types
from typing import TYPE_CHECKING, Callable

from benchmarks.cli import at_least, fail

if TYPE_CHECKING:
  import torch
  from torch.nn.attention.flex_attention import BlockMask


def _torch() -> types.ModuleType:
  """``torch``, imported here so that ``--help`` and argument errors need none; a machine without torch
  (or without a CUDA device for it) is refused in one line (exit 2)."""
  try:
    import torch  # noqa: PLC0415
    import torch._dynamo  # noqa: PLC0415, F401
    import triton.testing  # noqa: PLC0415, F401
  except ImportError as e:
    fail(f"benchmarks.flex_peer times torch's FlexAttention and needs torch with triton ({e}): pip install torch")
  if not torch.cuda.is_available():
    fail(f"benchmarks.flex_peer times FlexAttention on a GPU and needs CUDA (torch {torch.__version__} sees none): "
         "run it on a GPU machine")
  return torch


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
  import torch  # noqa: PLC0415

  for name in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, name):  # noqa: SLF001  (the documented knob; its name changed across torch versions)
      setattr(torch._dynamo.config, name, limit)  # noqa: SLF001


def time_shape(flex: Callable[..., torch.Tensor], mask: BlockMask, n: int, heads: int, kv_heads: int,
               head_dim: int) -> dict:
  """Median ms of forward and forward+backward at one shape: ``q [1, heads, n, head_dim]``, ``k, v
  [1, kv_heads, n, head_dim]``, bf16, random."""
  import torch  # noqa: PLC0415
  import triton.testing  # noqa: PLC0415

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


def _shape(text: str) -> tuple[int, int, int]:
  """An argparse ``type``: ``heads,kv_heads,head_dim``, three integers of at least 1, ``kv_heads`` dividing
  ``heads``."""
  try:
    heads, kv_heads, head_dim = map(int, text.split(","))
  except ValueError:
    fail(f"--shapes takes heads,kv_heads,head_dim (three integers), got {text!r}")
  if min(heads, kv_heads, head_dim) < 1 or heads % kv_heads:
    fail(f"--shapes takes heads,kv_heads,head_dim of at least 1 with kv_heads dividing heads, got {text!r}")
  return heads, kv_heads, head_dim


def _offsets(text: str) -> list[int]:
  """An argparse ``type``: comma-separated offsets, integers of at least 1."""
  try:
    offsets = [int(o) for o in text.split(",") if o]
  except ValueError:
    fail(f"--offsets takes comma-separated integers, got {text!r}")
  if not offsets or min(offsets) < 1:
    fail(f"--offsets takes comma-separated offsets of at least 1, got {text!r}")
  return offsets


def main(argv: list[str] | None = None) -> None:
  # plain argparse: fibjax.cli's parser imports JAX, which this torch process must not; its errors are one line too
  parser = argparse.ArgumentParser(prog="python -m benchmarks.flex_peer", description=__doc__)
  parser.error = lambda message: fail(f"{message} (--help lists the arguments)")
  parser.add_argument("--n", type=at_least(1, "--n", "sequence lengths"), nargs="+", required=True)
  parser.add_argument("--shapes", type=_shape, nargs="+", default=[(8, 8, 64)], help="heads,kv_heads,head_dim")
  parser.add_argument("--window", type=at_least(1, "--window"), required=True)
  parser.add_argument("--offsets", type=_offsets, required=True, help="comma-separated static offsets")
  args = parser.parse_args(argv)
  offsets = args.offsets
  torch = _torch()
  from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: PLC0415

  _allow_recompiles()
  flex = torch.compile(flex_attention, dynamic=False)
  res = {"torch": torch.__version__, "offsets": offsets, "window": args.window, "sizes": {}}
  masks = {}
  for heads, kv_heads, head_dim in args.shapes:  # the first shape at every length before the next shape
    shape = f"{heads},{kv_heads},{head_dim}"
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
