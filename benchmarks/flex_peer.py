"""FlexAttention (torch) with the fibjax mask, timed on the same GPU; prints one JSON line.

    python benchmarks/flex_peer.py 4096 16384 65536
"""

import json
import sys

import torch
import triton.testing
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

B, H, D, W, R = 1, 8, 64, 64, 4096


def fib_offsets():
  out, a, b = [], 1, 2
  while a < R:
    if W <= a < R:
      out.append(a)
    a, b = b, a + b
  return out


def main():
  offsets = fib_offsets()
  flex = torch.compile(flex_attention)

  def mask_mod(b, h, q, kv):
    d = q - kv
    hit = (d >= 0) & (d < W)
    for o in offsets:
      hit = hit | (d == o)
    return hit

  res = {"offsets": offsets, "sizes": {}}
  for n in map(int, sys.argv[1:]):
    try:
      mask = create_block_mask(mask_mod, B, H, n, n, device="cuda")
      q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
      fwd = triton.testing.do_bench(lambda: flex(q, k, v, block_mask=mask), warmup=50, rep=300, return_mode="median")
      g = torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16)

      def fb():
        out = flex(q, k, v, block_mask=mask)
        torch.autograd.grad(out, (q, k, v), g)

      fwd_bwd = triton.testing.do_bench(fb, warmup=50, rep=300, return_mode="median")
      res["sizes"][str(n)] = {"fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd}
    except Exception as e:  # noqa: BLE001
      res["sizes"][str(n)] = {"error": str(e).splitlines()[0][:200]}
    torch.cuda.empty_cache()
  print(json.dumps(res))


if __name__ == "__main__":
  main()
