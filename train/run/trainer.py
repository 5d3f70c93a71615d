"""The training loop: mesh, sharded state, jit step, evaluation, checkpoints, resume.

A start checks everything it can (config, workdir, data, windows) before it writes anything, so a
failed start leaves the workdir as it was. Every step's loss, gradient norm and parameter norm are
checked finite before the state is checkpointed; saves fail at once; resume falls back from a
damaged checkpoint to the newest intact one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import threading
import time
from typing import Any, Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fibjax.model import LM, count_params
from train.cli import write_whole
from train.run import checkpoint, rundir
from train.data import tasks, text as data
from train.run.mesh import make_mesh, together
from configs.base import TrainConfig, resolve_random_offsets
from train.run.evaluation import evaluate_into, heldout_loss
from train.run.metrics import Writer, flops_per_token, peak_flops_per_device, progress_bar
from train.run.step import make_eval_step, make_optimizer, make_train_step
from train.run.workdir import check_unlocked, check_workdir, record_changes, workdir_lock

BATCH_SPEC = P(None, ("data", "fsdp"), None)  # [accum, batch, T+1]: batch split over every device
HELDOUT_KEEP = 1 << 24  # held-out tokens a run keeps for evaluation (a prepared corpus may hold far more)


class TrainingStopped(RuntimeError):
  """The run stopped before its last step; the message says why and which checkpoint is kept."""


class NonFiniteLoss(TrainingStopped):
  pass


class Interrupted(TrainingStopped):
  pass


@contextlib.contextmanager
def interrupt_at_step_boundary() -> Iterator[threading.Event]:
  """Within the block, Ctrl-C sets the yielded event instead of raising wherever the main thread
  happens to be: a KeyboardInterrupt raised inside JAX's or Orbax's own calls (a result being
  read, a save thread being joined) can leave them waiting forever. The training loop stops at
  the next step boundary; a second Ctrl-C raises at once. Off the main thread, nothing changes."""
  stop = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield stop
    return

  def handler(signum, frame) -> None:
    if stop.is_set():
      signal.default_int_handler(signum, frame)
    stop.set()

  previous = signal.signal(signal.SIGINT, handler)
  try:
    yield stop
  finally:
    signal.signal(signal.SIGINT, previous)


@dataclasses.dataclass
class RunData:
  """What a run trains and evaluates on, read and checked before anything is written."""

  train: np.ndarray
  heldout: np.ndarray
  tokenizer: data.Tokenizer
  sha256: str | None  # content hash of the data path (None: the embedded corpus)


def init_state(cfg: TrainConfig, mesh: Mesh, tx) -> tuple[nnx.GraphDef, dict[str, Any]]:
  """Builds the model abstractly, then initialises params and optimizer state directly sharded
  by the params' NNX partitioning annotations (``"fsdp"``); returns ``(graphdef, state)``."""

  def init():
    params = nnx.state(LM(cfg.model, rngs=nnx.Rngs(cfg.seed)), nnx.Param)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: LM(cfg.model, rngs=nnx.Rngs(cfg.seed))))
  specs = nnx.get_partition_spec(jax.eval_shape(init))
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
  return graphdef, jax.jit(init, out_shardings=shardings)()


def shardings_of(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, tree)


def compile_train_step(graphdef, tx, state, mesh, pack_documents: bool = False, masked: bool = False):
  """The jit train step with explicit in/out shardings and the state buffer donated
  (``pack_documents``: ``train.run.step.token_nll``; ``masked``: the batch is ``(tokens, mask)``,
  ``train.run.step.make_train_step``)."""
  state_sh = shardings_of(state)
  batch_sh = NamedSharding(mesh, BATCH_SPEC)
  return jax.jit(
      make_train_step(graphdef, tx, pack_documents, masked),
      in_shardings=(state_sh, (batch_sh, batch_sh) if masked else batch_sh),
      out_shardings=(state_sh, NamedSharding(mesh, P())),
      donate_argnums=(0,),
  )


def global_batch(local_rows: np.ndarray, accum: int, mesh: Mesh) -> jax.Array:
  """This process's rows ``[b, T+1]`` -> the global ``[accum, B / accum, T+1]`` array (so too a
  task run's loss mask, ``[b, T]`` -> ``[accum, B / accum, T]``)."""
  rows = local_rows.reshape(accum, -1, local_rows.shape[-1])
  return jax.make_array_from_process_local_data(NamedSharding(mesh, BATCH_SPEC), rows)


def training_stream(cfg: TrainConfig, run_data: RunData) -> grain.IterDataset:
  """The Grain pipeline of training rows: text windows ``[b, T+1]`` (``data.train_dataset``), or
  with a task ``(tokens [b, T+1], loss mask [b, T])`` (``tasks.mixed_dataset``)."""
  spec = cfg.task_spec()
  if spec is None:
    return data.train_dataset(run_data.train, cfg.model.seq_len, cfg.batch_size, cfg.seed)
  return tasks.mixed_dataset(run_data.train, spec, cfg.task_mix, run_data.tokenizer.encode, cfg.batch_size, cfg.seed)


def load_data(cfg: TrainConfig, workdir: pathlib.Path, data_hash: str | None) -> RunData:
  """Train and held-out token streams and the tokenizer: from a prepared folder (memory-mapped),
  else read and tokenized (a BPE is trained on the training documents unless the run has one)."""
  path = None if cfg.data_path is None else pathlib.Path(cfg.data_path)
  if path is not None and data.is_prepared(path):
    train_tokens, heldout_tokens, manifest = data.open_prepared(path)
    check_prepared(cfg, path, manifest)
    tok = data.BPETokenizer.load(path / data.PREPARED_TOKENIZER) if cfg.tokenizer == "bpe" else data.ByteTokenizer()
    return RunData(train_tokens, heldout_tokens, tok, data_hash)
  train_docs, heldout_docs = data.split_documents(data.load_documents(cfg.data_path))
  if cfg.tokenizer == "byte":
    tok = data.ByteTokenizer()
  elif (workdir / rundir.TOKENIZER).exists():
    tok = data.BPETokenizer.load(workdir / rundir.TOKENIZER)
  else:
    tok = data.BPETokenizer.train(train_docs, cfg.bpe_vocab_size)
  return RunData(data.tokenize(train_docs, tok), data.tokenize(heldout_docs, tok), tok, data_hash)


def check_prepared(cfg: TrainConfig, path: pathlib.Path, manifest: dict) -> None:
  """A prepared folder's tokenizer must be the run's."""
  if (manifest["tokenizer"], manifest["vocab_size"]) != (cfg.tokenizer, cfg.model.vocab_size):
    raise ValueError(f"{path} was prepared with the {manifest['tokenizer']} tokenizer (vocabulary "
                     f"{manifest['vocab_size']}) but the run uses {cfg.tokenizer} (model.vocab_size "
                     f"{cfg.model.vocab_size}): add --set {' '.join(data.prepared_overrides(manifest))}")


def check_windows(cfg: TrainConfig, run_data: RunData) -> None:
  """Raises ``ValueError`` unless the training split fills a window of T + 1 tokens and the
  held-out split one of the final evaluation's longest length."""
  longest = max(cfg.final_eval_multiples) * cfg.model.seq_len
  for name, tokens, length, what in (("training", run_data.train, cfg.model.seq_len, "model.seq_len"),
                                     ("held-out", run_data.heldout, longest, "final_eval_multiples x model.seq_len")):
    if len(tokens) < length + 1:
      raise ValueError(f"the {name} split holds {len(tokens)} tokens, fewer than one window of {what} + 1 = "
                       f"{length + 1}: give more text with --data or lower model.seq_len")


def write_run_files(cfg: TrainConfig, workdir: pathlib.Path, run_data: RunData, budget: dict, resuming: bool,
                    created: bool) -> None:
  """config.json, the tokenizer, held-out tokens, data source and budget (process 0). A workdir this
  run ``created`` is removed again if a write fails, so a failed start leaves nothing behind."""
  if jax.process_index() != 0:
    return
  try:
    checkpoint.ensure_writable(rundir.checkpoints(workdir))
    write_whole(workdir / rundir.CONFIG, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    if isinstance(run_data.tokenizer, data.BPETokenizer) and not (workdir / rundir.TOKENIZER).exists():
      run_data.tokenizer.save(workdir / rundir.TOKENIZER)
    if not (resuming and (workdir / rundir.HELDOUT_TOKENS).exists()):
      data.save_heldout(np.asarray(run_data.heldout[:HELDOUT_KEEP]), workdir / rundir.HELDOUT_TOKENS)
    source = {"path": cfg.data_path, "sha256": run_data.sha256}
    write_whole(workdir / rundir.DATA_SOURCE, json.dumps(source, indent=2) + "\n")
    write_whole(workdir / rundir.DATA_BUDGET, json.dumps(budget, indent=2) + "\n")
  except (OSError, checkpoint.CheckpointError) as e:
    if created:
      shutil.rmtree(workdir, ignore_errors=True)
    raise ValueError(f"cannot write the run's files into {workdir} ({checkpoint.short(e)}); give a writable "
                     "--workdir") from e


def nonfinite(step: int, metrics: dict[str, float], last_saved: int | None, folder: pathlib.Path,
              cfg: TrainConfig) -> NonFiniteLoss:
  values = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
  kept = (f"the last finite checkpoint, step {last_saved} in {folder}, is kept: resume from it"
          if last_saved is not None else "no checkpoint was saved before it: start again in a new --workdir")
  how = (f"e.g. --set lr={cfg.lr / 10:g} --allow-change lr" if last_saved is not None else
         f"e.g. --set lr={cfg.lr / 10:g}")
  return NonFiniteLoss(f"step {step} is not finite ({values}); stopped before saving it, {kept} with a lower lr "
                       f"(now {cfg.lr}) or more warmup_steps (now {cfg.warmup_steps}), {how}")


def check_start(cfg: TrainConfig, workdir: pathlib.Path, devices: int, allow_changes: Sequence[str] = ()
                ) -> tuple[TrainConfig, RunData, dict, dict | None]:
  """Every check a start makes before it writes anything: ``(cfg, data, budget, changes)`` with
  the data path made absolute; ``changes`` is ``None`` for a new run, else the config changes the
  resume makes (``train.run.workdir.check_workdir``).

  Raises:
    ValueError: a bad config, an incompatible workdir, or unusable data.
  """
  # a *-random run's drawn offsets are saved in its config.json
  cfg = resolve_random_offsets(cfg.validate().check_backend(jax.default_backend()))
  if cfg.data_path is not None:
    cfg = dataclasses.replace(cfg, data_path=str(pathlib.Path(cfg.data_path).resolve()))
    check_apart(workdir, pathlib.Path(cfg.data_path))
  data_hash = data.fingerprint(cfg.data_path)
  changes = check_workdir(workdir, cfg, data_hash, allow_changes)
  micro = cfg.batch_size // cfg.grad_accum
  if micro % devices:
    raise ValueError(f"batch_size / grad_accum = {micro} must be divisible by the {devices} devices")
  run_data = load_data(cfg, workdir, data_hash)
  check_windows(cfg, run_data)
  budget = data.data_budget(cfg.batch_size * cfg.model.seq_len, cfg.steps, cfg.model.seq_len, len(run_data.train))
  return cfg, run_data, budget, changes


def check_apart(workdir: pathlib.Path, data_path: pathlib.Path) -> None:
  """Raises ``ValueError`` if ``workdir`` and ``data_path`` (resolved, links followed) overlap: the
  run would write into its own data, changing the content hash a resume checks, and tools reading
  the data folder would read the run's files as text."""
  work, source = workdir.resolve(), data_path.resolve()
  if work == source or work.is_relative_to(source):
    raise ValueError(f"--workdir {work} is inside --data {source}; keep them apart")
  if source.is_relative_to(work):
    raise ValueError(f"--data {source} is inside --workdir {work}; keep them apart")


def restore_run(cfg: TrainConfig, workdir: pathlib.Path, target: Any) -> tuple[int, Any, dict] | None:
  """The newest intact checkpoint of the run in ``workdir`` (see ``checkpoint.restore_newest_intact``)."""
  mngr = checkpoint.manager(workdir, cfg)
  try:
    return checkpoint.restore_newest_intact(mngr, target)
  finally:
    mngr.close()


def train(cfg: TrainConfig, workdir: pathlib.Path, allow_changes: Sequence[str] = (), resume: str | None = None) -> dict:
  """Trains (or resumes) ``cfg`` in ``workdir``; returns the closing summary. What a resume may
  change (``allow_changes``: the ``--allow-change`` fields) and the workdir's lock, which process 0
  holds from before its first write to after its last: ``train.run.workdir``. ``resume``: how to
  resume after Ctrl-C, for its message (default ``python -m train --workdir WORKDIR``).

  Raises:
    ValueError: a bad config, data or workdir, or another process training in it (before anything
      is written); in a job of several processes, on each of them when one fails so
      (``train.run.mesh.together``).
    checkpoint.CheckpointError: a save failed, or no checkpoint of the run is intact.
    TrainingStopped: the step became non-finite (``NonFiniteLoss``) or the user pressed Ctrl-C
      (``Interrupted``); the last finite checkpoint is kept.
  """
  workdir = pathlib.Path(os.path.abspath(workdir))
  lead = jax.process_index() == 0
  with together():  # a job of several processes starts on all of them or on none
    if lead:
      check_unlocked(workdir)  # first, so a run in progress is named as such
    mesh = make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
    cfg, run_data, budget, _ = check_start(cfg, workdir, mesh.devices.size, allow_changes)
  with contextlib.ExitStack() as lock:
    with together():  # and every process has read the workdir before process 0 writes into it
      created = lock.enter_context(workdir_lock(workdir)) if lead else False
      # checked again under the lock: what another process wrote since the checks above counts
      changes = check_workdir(workdir, cfg, run_data.sha256, allow_changes)
    return train_locked(cfg, workdir, mesh, run_data, budget, changes, created,
                        resume or f"python -m train --workdir {workdir}")


def train_locked(cfg: TrainConfig, workdir: pathlib.Path, mesh: Mesh, run_data: RunData, budget: dict,
                 changes: dict | None, created: bool, resume: str) -> dict:
  """``train`` once the start is checked and the lock taken; ``changes`` as ``check_start``'s,
  ``created`` whether this run made ``workdir``, ``resume`` how to resume after Ctrl-C."""
  resuming = changes is not None
  micro = cfg.batch_size // cfg.grad_accum
  tx = make_optimizer(cfg)
  folder = rundir.checkpoints(workdir)
  with jax.set_mesh(mesh):
    graphdef, state = init_state(cfg, mesh, tx)
    num_params = count_params(nnx.merge(graphdef, state["params"]))
    found = restore_run(cfg, workdir, state) if resuming else None
    if found is not None:
      record_changes(workdir, found[0], changes)
    write_run_files(cfg, workdir, run_data, budget, resuming, created)
    if jax.process_index() == 0:
      if cfg.task is None or cfg.task_mix < 1:  # a task alone trains on no text
        print(f"data: {budget['training_tokens']:,} training tokens = {budget['repeats']:.2f} x the "
              f"{budget['corpus_train_tokens']:,} distinct training tokens of the corpus", flush=True)
      if cfg.task is not None:
        print(f"task: {cfg.task}, distances {cfg.task_spec().law}, in {100 * cfg.task_mix:g}% of the rows (the rest "
              "text); only a task row's answer tokens are scored", flush=True)
    iterator = iter(training_stream(cfg, run_data))
    start, last_saved, saving = 0, None, None
    if found is not None:
      start, state, data_state = found
      iterator.set_state(data_state)
      last_saved = start
    mngr = checkpoint.manager(workdir, cfg)
    try:
      step_fn = compile_train_step(graphdef, tx, state, mesh, cfg.pack_documents, masked=cfg.task is not None)
      eval_fn = jax.jit(make_eval_step(graphdef, cfg.pack_documents))
      heldout_windows = data.eval_windows(run_data.heldout, cfg.model.seq_len,
                                          cfg.eval_batches * micro * cfg.model.seq_len)
      writer = Writer(workdir, resume_step=start)
      writer.write(start, event="resume" if start else "start", params=num_params, devices=jax.device_count(),
                   mesh=dict(mesh.shape))
      tokens_per_step = cfg.batch_size * cfg.model.seq_len
      flops_step = flops_per_token(cfg.model, num_params) * tokens_per_step
      peak = peak_flops_per_device()
      bar = progress_bar(cfg.steps, start, cfg.progress)
      pending, t_last, steps_since, step = None, time.perf_counter(), 0, start

      def check(step_done: int, metrics) -> dict[str, float]:
        values = {k: float(v) for k, v in metrics.items()}
        if not all(math.isfinite(v) for v in values.values()):
          writer.write(step_done, event="nonfinite", **values)
          raise nonfinite(step_done, values, last_saved, folder, cfg)
        return values

      try:
        with interrupt_at_step_boundary() as stop:
          for step in range(start, cfg.steps):
            if stop.is_set():
              raise KeyboardInterrupt
            batch = jax.tree.map(lambda rows: global_batch(rows, cfg.grad_accum, mesh), next(iterator))
            state, metrics = step_fn(state, batch)
            if pending is not None:  # read the previous step's metrics while this one runs
              check(*pending)
            checkpoint.check_saves(mngr, saving)
            pending, steps_since, done = (step + 1, metrics), steps_since + 1, step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
              values = check(*pending)
              now = time.perf_counter()
              tps = steps_since * tokens_per_step / (now - t_last)
              mfu = (tps / tokens_per_step) * flops_step / (peak * jax.device_count()) if peak else None
              values = {"loss": values["loss"], "grad_norm": values["grad_norm"], "tokens_per_s": tps}
              if mfu is not None:
                values["mfu"] = mfu
              writer.write(done, **values)
              bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{tps:,.0f}",
                              mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%")
              t_last, steps_since = time.perf_counter(), 0
            if done % cfg.eval_every == 0 or done == cfg.steps:
              check(*pending)
              nll = heldout_loss(eval_fn, state["params"], heldout_windows, micro, mesh)
              writer.write(done, heldout_loss=float(nll.mean()), heldout_ppl=float(math.exp(min(nll.mean(), 700))))
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
              check(*pending)
              checkpoint.check_saves(mngr, saving, wait=True)  # the previous save's failure, named as its own
              checkpoint.save(mngr, done, state, iterator.get_state(), force=done == cfg.steps)
              last_saved, saving = done, done
            bar.update(1)
          if pending is not None:
            check(*pending)
          if stop.is_set():  # Ctrl-C during the last step: stop before the final evaluation, as at any step
            step = cfg.steps
            raise KeyboardInterrupt
      except KeyboardInterrupt:
        kept = f"checkpoint step {last_saved} in {folder} is kept" if last_saved is not None else "no checkpoint saved"
        raise Interrupted(f"interrupted at step {step}; {kept}. Resume with: {resume}") from None
      finally:
        bar.close()
        writer.close()
    finally:
      checkpoint.finish(mngr, saving)

    _, result = evaluate_into(workdir, cfg.steps, cfg, mesh, graphdef, state["params"],
                              np.asarray(run_data.heldout[:HELDOUT_KEEP]), tuple(cfg.final_eval_multiples),
                              cfg.final_eval_tokens)
  result = {**result, "params": num_params}
  if jax.process_index() == 0:
    write_whole(workdir / rundir.EVAL, json.dumps(result, indent=2) + "\n")
  return {"workdir": str(workdir), "checkpoint": str(folder / str(last_saved)), "start_step": start,
          "metrics": str(workdir / rundir.METRICS), "tensorboard": str(workdir / rundir.TENSORBOARD),
          "eval": str(workdir / rundir.EVAL), "result": result}
