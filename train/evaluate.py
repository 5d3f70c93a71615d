"""Held-out evaluation at multiples of the training length T, on identical target tokens.

    python -m train.evaluate --workdir RUN                        # 1x, 2x, 4x T on the run's held-out split
    python -m train.evaluate --workdir RUN --lengths 1 2 4 8 --data my_text.txt --tokens 262144

Every length scores the same targets: the held-out stream is cut into chunks of ``lcm(lengths) x T``
targets and each length tiles every chunk with consecutive windows, so a longer window differs
only in how much context each target has (a paired comparison). Parameters alone are restored,
from the newest checkpoint that restores intact (a damaged newer one is skipped with a warning and
left in place); neither the optimizer state nor the training corpus is needed. Each evaluation is
written to ``RUN/evals/<what was evaluated>.json`` and never overwrites another: the same
evaluation asked again is read back from its file ("reused PATH"), not recomputed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pathlib
import sys
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fibjax.cli import ArgumentParser
from configs.base import TrainConfig
from train import data
from train.mesh import MESH_AXES
from train.restore import Run, load_run
from train.step import make_eval_step

EVALS_DIR = "evals"


def heldout_loss(eval_fn: Callable, params: Any, windows: np.ndarray, rows: int, mesh: Mesh) -> np.ndarray:
  """Mean NLL per position ``[L]`` over ``windows [n, L+1]``, ``rows`` windows per call."""
  total = np.zeros(windows.shape[1] - 1)
  ndev = mesh.devices.size
  for i in range(0, len(windows), rows):
    batch = windows[i : i + rows]
    spec = P(MESH_AXES) if len(batch) % ndev == 0 else P()
    total += np.asarray(eval_fn(params, jax.device_put(batch, NamedSharding(mesh, spec))))
  return total / len(windows)


def nested_windows(tokens: np.ndarray, seq_len: int, multiples: tuple[int, ...], max_targets: int
                   ) -> dict[int, np.ndarray]:
  """For each multiple ``m``: windows ``[n * C / m, m * T + 1]`` (int32) tiling the same ``n``
  chunks of ``C = lcm(multiples) * T`` consecutive targets, ``n = max_targets // C`` (at least 1).

  Window ``j`` of a chunk starting at ``s`` holds tokens ``s + j*L .. s + (j+1)*L`` (``L + 1``
  tokens: inputs and, shifted by one, targets), so every length scores targets ``s+1 .. s+C``."""
  if not multiples or min(multiples) < 1:
    raise ValueError(f"lengths must be positive multiples of T, got {multiples}")
  chunk = math.lcm(*multiples) * seq_len
  chunks = data.eval_windows(tokens, chunk, max_targets)  # [n, C + 1]
  out = {}
  for m in multiples:
    length = m * seq_len
    starts = np.arange(0, chunk, length)
    idx = starts[:, None] + np.arange(length + 1)[None, :]  # [C / L, L + 1]
    out[m] = chunks[:, idx].reshape(-1, length + 1)
  return out


def score_lengths(graphdef: nnx.GraphDef, params: Any, tokens: np.ndarray, seq_len: int, multiples: tuple[int, ...],
                  max_targets: int, rows: int, mesh, buckets: int, pack_documents: bool = False) -> dict[str, Any]:
  """Loss and perplexity at each multiple of T on identical targets, loss by context position
  (``buckets`` equal spans of the window) and the rise against the shortest length.
  ``pack_documents``: documents attend only within themselves (``train.step.token_nll``)."""
  eval_fn = jax.jit(make_eval_step(graphdef, pack_documents))
  windows = nested_windows(tokens, seq_len, multiples, max_targets)
  out: dict[str, Any] = {"train_length": seq_len, "multiples": list(multiples),
                         "targets": int(windows[multiples[0]].shape[0] * multiples[0] * seq_len)}
  for m in multiples:
    nll = heldout_loss(eval_fn, params, windows[m], max(1, rows // m), mesh)
    parts = np.array_split(nll, buckets)
    out[f"{m}x"] = {
        "length": m * seq_len, "windows": int(len(windows[m])), "loss": float(nll.mean()),
        "ppl": float(math.exp(nll.mean())), "bucket_loss": [float(b.mean()) for b in parts],
        "bucket_edges": [int(sum(len(x) for x in parts[:i])) for i in range(len(parts) + 1)],
    }
  base = out[f"{multiples[0]}x"]["ppl"]
  for m in multiples:
    out[f"{m}x"][rise_key(multiples)] = out[f"{m}x"]["ppl"] / base - 1
  return out


def rise_key(multiples: tuple[int, ...]) -> str:
  """The result field of the perplexity rise against the shortest length, named by it
  (``ppl_rise_vs_1x`` when 1x T is evaluated)."""
  return f"ppl_rise_vs_{min(multiples)}x"


def score(cfg: TrainConfig, mesh: Mesh, graphdef: nnx.GraphDef, params: Any, tokens: np.ndarray, multiples: tuple[int, ...],
          max_targets: int) -> dict[str, Any]:
  """``score_lengths`` with the run's T, batch rows, position buckets and packing from ``cfg``;
  ``graphdef`` and ``params`` are the run's model or a variant of it (``train.budget``)."""
  return score_lengths(graphdef, params, tokens, cfg.model.seq_len, multiples, max_targets,
                       cfg.batch_size // cfg.grad_accum, mesh, cfg.position_buckets, cfg.pack_documents)


def sorted_lengths(multiples: tuple[int, ...]) -> tuple[int, ...]:
  """``multiples`` ascending without repeats: the first is the shortest, which the rise is measured against."""
  return tuple(sorted(set(multiples)))


def check_fits(tokens: np.ndarray, seq_len: int, multiples: tuple[int, ...], source: str) -> None:
  """Raises ``ValueError`` naming ``--lengths`` when one chunk of ``lcm(multiples) x T`` targets
  (``nested_windows``) needs more tokens than ``source`` holds."""
  lcm = math.lcm(*multiples)
  needed = lcm * seq_len + 1
  if needed > len(tokens):
    most = (len(tokens) - 1) // seq_len
    raise ValueError(f"--lengths {' '.join(map(str, multiples))} need {needed:,} consecutive tokens (their lcm {lcm} "
                     f"x T={seq_len}, plus one) but {source} holds {len(tokens):,}: lower --lengths so their lcm is "
                     f"at most {most}, or give --data with more text")


def data_tag(path: str | None, tokens: np.ndarray) -> str:
  """``heldout`` for the run's own split, else ``<file stem>-<sha1 of its tokens, 8 hex digits>``."""
  if path is None:
    return "heldout"
  stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in pathlib.Path(path).name.split(".")[0])
  return f"{stem}-{hashlib.sha1(np.ascontiguousarray(tokens).tobytes()).hexdigest()[:8]}"


def evaluation_name(step: int, tag: str, multiples: tuple[int, ...], max_targets: int) -> str:
  return f"step{step}_{tag}_x{'-'.join(map(str, multiples))}_t{max_targets}"


def tokens_of(path: str, tokenizer: data.Tokenizer) -> np.ndarray:
  """Every document under ``path`` as one evaluation stream (the user's text is all held out)."""
  if not pathlib.Path(path).exists():
    raise ValueError(f"--data {path!r} does not exist: give a .txt/.jsonl file or a folder of them")
  return data.tokenize(data.load_documents(path), tokenizer)


def write_new(path: pathlib.Path, record: dict) -> None:
  """Writes ``record`` as JSON to ``path`` through a temporary file; never replaces a file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(record, indent=2) + "\n")
  if path.exists():
    tmp.unlink()
    raise ValueError(f"{path} already exists; it is not overwritten")
  tmp.rename(path)


def read_or_write(path: pathlib.Path, compute: Callable[[], dict]) -> tuple[pathlib.Path, dict]:
  """``(path, record)``: the record already written under ``path`` (same name: same evaluation),
  else ``compute()`` (run by every process) written there by process 0."""
  if path.exists():
    return path, json.loads(path.read_text())
  record = compute()
  if jax.process_index() == 0:
    write_new(path, record)
  return path, record


def evaluation_path(workdir: pathlib.Path, step: int, tokens: np.ndarray, multiples: tuple[int, ...],
                    max_targets: int, data_path: str | None = None) -> pathlib.Path:
  """Where ``evaluate_into`` writes (or finds) this evaluation."""
  data_path = data_path and str(pathlib.Path(data_path).absolute())
  name = evaluation_name(step, data_tag(data_path, tokens), multiples, max_targets)
  return pathlib.Path(workdir) / EVALS_DIR / f"{name}.json"


def evaluate_into(workdir: pathlib.Path, step: int, cfg: TrainConfig, mesh: Mesh, graphdef: nnx.GraphDef, params: Any,
                  tokens: np.ndarray, multiples: tuple[int, ...], max_targets: int, data_path: str | None = None
                  ) -> tuple[pathlib.Path, dict]:
  """Scores ``tokens`` (the run's held-out split, or the text at ``data_path``) and writes the
  record to ``workdir/evals/<step, text, lengths, tokens>.json``; an evaluation already written
  under that name is read, not redone. Returns ``(path, record)``."""
  data_path = data_path and str(pathlib.Path(data_path).absolute())
  multiples = sorted_lengths(multiples)
  tag = data_tag(data_path, tokens)
  path = evaluation_path(workdir, step, tokens, multiples, max_targets, data_path)

  def compute() -> dict:
    with jax.set_mesh(mesh):
      record = score(cfg, mesh, graphdef, params, tokens, multiples, max_targets)
    return {**record, "step": step, "data": data_path, "data_tag": tag, "variant": cfg.model.variant,
            "seed": cfg.seed}

  return read_or_write(path, compute)


def run_evaluation(workdir: pathlib.Path, multiples: tuple[int, ...] = (1, 2, 4), data_path: str | None = None,
                   max_targets: int | None = None, run: Run | None = None) -> tuple[pathlib.Path, dict]:
  """Evaluates ``workdir``'s newest intact checkpoint (``load_run``, ``evaluate_into``)."""
  run = run or load_run(workdir)
  tokens = run.heldout() if data_path is None else tokens_of(data_path, run.tokenizer)
  return evaluate_into(run.workdir, run.step, run.cfg, run.mesh, run.graphdef, run.params, tokens, multiples,
                       max_targets or run.cfg.final_eval_tokens, data_path)


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, type=pathlib.Path)
  parser.add_argument("--lengths", type=int, nargs="+", default=[1, 2, 4],
                      help="multiples of T, evaluated in ascending order (default 1 2 4)")
  parser.add_argument("--data", default=None, help="held-out .txt/.jsonl file or folder (default: the run's own split)")
  parser.add_argument("--tokens", type=int, default=None, help="target tokens per length (default: the config's)")
  args = parser.parse_args(argv)
  try:
    if args.tokens is not None and args.tokens < 1:
      raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
    if min(args.lengths) < 1:
      raise ValueError(f"--lengths are multiples of T and must be >= 1, got {args.lengths}")
    if args.data is not None and not pathlib.Path(args.data).exists():
      raise ValueError(f"--data {args.data!r} does not exist: give a .txt/.jsonl file or a folder of them")
    run = load_run(args.workdir)
    tokens = run.heldout() if args.data is None else tokens_of(args.data, run.tokenizer)
    max_targets = args.tokens or run.cfg.final_eval_tokens
    multiples = sorted_lengths(args.lengths)
    check_fits(tokens, run.cfg.model.seq_len, multiples,
               "the run's held-out split" if args.data is None else f"--data {args.data}")
    reused = evaluation_path(run.workdir, run.step, tokens, multiples, max_targets, args.data).exists()
    path, record = evaluate_into(run.workdir, run.step, run.cfg, run.mesh, run.graphdef, run.params, tokens,
                                 multiples, max_targets, args.data)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for m in record["multiples"]:
    r = record[f"{m}x"]
    rise = r[rise_key(record["multiples"])]
    print(f"{m}x T={r['length']}: loss {r['loss']:.4f} ppl {r['ppl']:.3f} ({100 * rise:+.1f}%)")
  done = f"reused {path} (written earlier; nothing recomputed)" if reused else f"wrote {path}"
  print(f"{record['targets']:,} identical targets per length; {done}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
