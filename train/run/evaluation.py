"""Held-out evaluation at multiples of the training length T, on identical target tokens.

Every length scores the same targets: the held-out stream is cut into chunks of ``lcm(lengths) x T``
targets and each length tiles every chunk with consecutive windows, so a longer window differs
only in how much context each target has (a paired comparison). Each evaluation is written to
``RUN/evals/<what was evaluated>.json`` and never overwrites another: the same evaluation asked
again is read back from its file. The trainer's final evaluation and ``python -m train.evaluate``
(``train.probe.evaluate``) both run through ``evaluate_into``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import pathlib
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs.base import TrainConfig
from fibjax.model import LM
from train.data import text as data
from train.run import rundir
from train.run.mesh import MESH_AXES
from train.run.step import make_eval_step


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


@functools.lru_cache(maxsize=16)
def compiled_eval_step(graphdef: nnx.GraphDef, pack_documents: bool = False) -> Callable:
  """``jax.jit(make_eval_step(...))``, one per model graph: the probes of a run score several texts
  with the same graph, and each would otherwise trace and compile it again."""
  return jax.jit(make_eval_step(graphdef, pack_documents))


def score_lengths(graphdef: nnx.GraphDef, params: Any, tokens: np.ndarray, seq_len: int, multiples: tuple[int, ...],
                  max_targets: int, rows: int, mesh, buckets: int, pack_documents: bool = False) -> dict[str, Any]:
  """Loss and perplexity at each multiple of T on identical targets, loss by context position
  (``buckets`` equal spans of the window) and the rise against the shortest length.
  ``pack_documents``: documents attend only within themselves (``train.run.step.token_nll``)."""
  eval_fn = compiled_eval_step(graphdef, pack_documents)
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
  ``graphdef`` and ``params`` are the run's model or a variant of it (``train.probe.budget``)."""
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
  most = (len(tokens) - 1) // seq_len
  if needed > len(tokens) and most < 1:  # no --lengths fits: the text is shorter than one window
    raise ValueError(f"{source} holds {len(tokens):,} tokens, fewer than one window of T={seq_len} plus one: give "
                     f"--data with more text (--lengths {' '.join(map(str, multiples))} need {needed:,} tokens)")
  if needed > len(tokens):
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


def write_new(path: pathlib.Path, record: dict) -> None:
  """Writes ``record`` as JSON to ``path`` through a temporary file; never replaces a file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  try:
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    if path.exists():
      raise ValueError(f"{path} already exists; it is not overwritten")
    tmp.rename(path)
  except BaseException:  # an interrupted write too: no temporary file is left behind
    tmp.unlink(missing_ok=True)
    raise


def read_or_write(path: pathlib.Path, compute: Callable[[], dict]) -> tuple[pathlib.Path, dict]:
  """``(path, record)``: the record already written under ``path`` (same name: same evaluation),
  else ``compute()`` (run by every process) written there by process 0. A file where ``path``'s
  folder should be is refused before anything is computed."""
  if path.exists():
    return path, json.loads(path.read_text())
  if path.parent.exists() and not path.parent.is_dir():
    raise ValueError(f"{path.parent} is a file, not a folder: move it away so that the results can be written there")
  record = compute()
  if jax.process_index() == 0:
    write_new(path, record)
  return path, record


def done_line(path: pathlib.Path, reused: bool) -> str:
  """What a probe says of its file: read back (``read_or_write`` found it) or written now."""
  return f"reused {path} (written earlier; nothing recomputed)" if reused else f"wrote {path}"


def evaluation_path(workdir: pathlib.Path, step: int, tokens: np.ndarray, multiples: tuple[int, ...],
                    max_targets: int, data_path: str | None = None, sinks: int | None = None) -> pathlib.Path:
  """Where ``evaluate_into`` writes (or finds) this evaluation."""
  data_path = data_path and str(pathlib.Path(data_path).absolute())
  name = evaluation_name(step, data_tag(data_path, tokens), multiples, max_targets)
  return pathlib.Path(workdir) / rundir.EVALS / f"{name}{'' if sinks is None else f'_sink{sinks}'}.json"


def sink_window_graph(cfg: TrainConfig, sinks: int) -> nnx.GraphDef:
  """The graph of the dense model ``cfg`` attending to a sliding window of T keys plus its first
  ``sinks`` tokens (StreamingLLM; ``fibjax.model.ModelConfig.eval_window``); the parameters are the
  run's own. Raises ``ValueError`` for a sparse model."""
  if cfg.model.variant != "dense":
    raise ValueError(f"a sink window is an evaluation of a dense run; this one is {cfg.model.variant!r}: drop "
                     "--sink-window, or give a dense run")
  model = dataclasses.replace(cfg.model, eval_window=cfg.model.seq_len, eval_sinks=sinks)
  return nnx.graphdef(nnx.eval_shape(lambda: LM(model, rngs=nnx.Rngs(0))))


def evaluate_into(workdir: pathlib.Path, step: int, cfg: TrainConfig, mesh: Mesh, graphdef: nnx.GraphDef, params: Any,
                  tokens: np.ndarray, multiples: tuple[int, ...], max_targets: int, data_path: str | None = None,
                  sinks: int | None = None) -> tuple[pathlib.Path, dict]:
  """Scores ``tokens`` (the run's held-out split, or the text at ``data_path``) and writes the
  record to ``workdir/evals/<step, text, lengths, tokens[, sinks]>.json``; an evaluation already
  written under that name is read, not redone. ``sinks``: a dense run scored with a sliding window
  of T keys plus that many sink tokens (``sink_window_graph``) instead of ``graphdef``.
  Returns ``(path, record)``."""
  data_path = data_path and str(pathlib.Path(data_path).absolute())
  multiples = sorted_lengths(multiples)
  tag = data_tag(data_path, tokens)
  path = evaluation_path(workdir, step, tokens, multiples, max_targets, data_path, sinks)
  if sinks is not None:
    graphdef = sink_window_graph(cfg, sinks)

  def compute() -> dict:
    with jax.set_mesh(mesh):
      record = score(cfg, mesh, graphdef, params, tokens, multiples, max_targets)
    return {**record, "step": step, "data": data_path, "data_tag": tag, "variant": cfg.model.variant,
            "seed": cfg.seed, "sinks": sinks}

  return read_or_write(path, compute)
