"""The training loop: mesh, sharded state, jit step, evaluation, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fibjax.model import LM, count_params
from train import checkpoint, data
from train.mesh import make_mesh
from train.restore import BUDGET_FILE, HELDOUT_FILE
from configs.base import TrainConfig
from train.evaluate import evaluate, heldout_loss
from train.metrics import Writer, flops_per_token, peak_flops_per_device, progress_bar
from train.step import make_eval_step, make_optimizer, make_train_step

BATCH_SPEC = P(None, ("data", "fsdp"), None)  # [accum, batch, T+1]: batch split over every device


class NonFiniteLoss(RuntimeError):
  pass


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


def compile_train_step(graphdef, tx, state, mesh):
  """The jit train step with explicit in/out shardings and the state buffer donated."""
  state_sh = shardings_of(state)
  return jax.jit(
      make_train_step(graphdef, tx),
      in_shardings=(state_sh, NamedSharding(mesh, BATCH_SPEC)),
      out_shardings=(state_sh, NamedSharding(mesh, P())),
      donate_argnums=(0,),
  )


def global_batch(local_rows: np.ndarray, accum: int, mesh: Mesh) -> jax.Array:
  """This process's rows ``[b, T+1]`` -> the global ``[accum, B / accum, T+1]`` array."""
  rows = local_rows.reshape(accum, -1, local_rows.shape[-1])
  return jax.make_array_from_process_local_data(NamedSharding(mesh, BATCH_SPEC), rows)


def load_tokens(cfg: TrainConfig, workdir: pathlib.Path, resuming: bool) -> tuple[np.ndarray, np.ndarray, Any]:
  """Train and held-out token streams and the tokenizer (a BPE is trained once, kept in workdir)."""
  train_docs, heldout_docs = data.split_documents(data.load_documents(cfg.data_path))
  if cfg.tokenizer == "byte":
    tok = data.ByteTokenizer()
  else:
    path = workdir / "tokenizer.json"
    if resuming or path.exists():
      tok = data.BPETokenizer.load(path)
    else:
      tok = data.BPETokenizer.train(train_docs, cfg.bpe_vocab_size)
      if jax.process_index() == 0:
        tok.save(path)
  return data.tokenize(train_docs, tok), data.tokenize(heldout_docs, tok), tok


def train(cfg: TrainConfig, workdir: pathlib.Path) -> dict:
  """Trains (or resumes) ``cfg`` in ``workdir``; returns the closing summary.

  Raises:
    ValueError: a bad config or an incompatible workdir (before anything is written).
    NonFiniteLoss: the loss became NaN/Inf; the last good checkpoint is kept.
  """
  cfg.validate()
  workdir = pathlib.Path(workdir)
  resuming = workdir.exists() and checkpoint.check_workdir(workdir, cfg)
  mesh = make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
  micro = cfg.batch_size // cfg.grad_accum
  if micro % mesh.devices.size:
    raise ValueError(f"batch_size / grad_accum = {micro} must be divisible by the {mesh.devices.size} devices")
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    cfg.save(workdir / "config.json")
  train_tokens, heldout_tokens, _ = load_tokens(cfg, workdir, resuming)
  budget = data.data_budget(cfg.batch_size * cfg.model.seq_len, cfg.steps, cfg.model.seq_len, len(train_tokens))
  if jax.process_index() == 0:
    data.save_heldout(heldout_tokens, workdir / HELDOUT_FILE)
    (workdir / BUDGET_FILE).write_text(json.dumps(budget, indent=2) + "\n")
    print(f"data: {budget['training_tokens']:,} training tokens = {budget['repeats']:.2f} x the "
          f"{budget['corpus_train_tokens']:,} distinct training tokens of the corpus", flush=True)

  tx = make_optimizer(cfg)
  with jax.set_mesh(mesh):
    graphdef, state = init_state(cfg, mesh, tx)
    num_params = count_params(nnx.merge(graphdef, state["params"]))
    mngr = checkpoint.manager(workdir, cfg)
    iterator = iter(data.train_dataset(train_tokens, cfg.model.seq_len, cfg.batch_size, cfg.seed))
    start = 0
    if resuming and mngr.latest_step() is not None:
      start = int(mngr.latest_step())
      state, data_state = checkpoint.restore(mngr, start, state)
      iterator.set_state(data_state)
    step_fn = compile_train_step(graphdef, tx, state, mesh)
    eval_fn = jax.jit(make_eval_step(graphdef))
    heldout_windows = data.eval_windows(heldout_tokens, cfg.model.seq_len, cfg.eval_batches * micro * cfg.model.seq_len)

    writer = Writer(workdir)
    writer.write(start, event="resume" if start else "start", params=num_params, devices=jax.device_count(),
                 mesh=dict(mesh.shape))
    tokens_per_step = cfg.batch_size * cfg.model.seq_len
    flops_step = flops_per_token(cfg.model, num_params) * tokens_per_step
    peak = peak_flops_per_device()
    bar = progress_bar(cfg.steps, start, cfg.progress)
    last_good, pending, t_last, steps_since = start, None, time.perf_counter(), 0

    def check(step_done: int, metrics) -> float:
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        raise NonFiniteLoss(f"loss became {loss} at step {step_done}; stopped. The last good checkpoint "
                            f"(step {mngr.latest_step()}) in {workdir / 'checkpoints'} is kept. Lower lr "
                            f"(now {cfg.lr}) or raise warmup_steps, then resume from it.")
      return loss

    try:
      for step in range(start, cfg.steps):
        batch = global_batch(next(iterator), cfg.grad_accum, mesh)
        state, metrics = step_fn(state, batch)
        if pending is not None:  # read the previous step's loss while this one runs
          check(*pending)
        pending, steps_since, done = (step + 1, metrics), steps_since + 1, step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
          loss = check(*pending)
          now = time.perf_counter()
          tps = steps_since * tokens_per_step / (now - t_last)
          mfu = (tps / tokens_per_step) * flops_step / (peak * jax.device_count()) if peak else None
          values = {"loss": loss, "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tps}
          if mfu is not None:
            values["mfu"] = mfu
          writer.write(done, **values)
          bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%")
          t_last, steps_since = time.perf_counter(), 0
        if done % cfg.eval_every == 0 or done == cfg.steps:
          nll = heldout_loss(eval_fn, state["params"], heldout_windows, micro, mesh)
          writer.write(done, heldout_loss=float(nll.mean()), heldout_ppl=float(math.exp(nll.mean())))
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
          check(*pending)
          checkpoint.save(mngr, done, state, iterator.get_state(), force=done == cfg.steps)
          last_good = done
        bar.update(1)
      if pending is not None:
        check(*pending)
    finally:
      bar.close()
      mngr.wait_until_finished()
      mngr.close()
      writer.close()

    result = evaluate(graphdef, state["params"], cfg, heldout_tokens, mesh)
  result.update(step=cfg.steps, params=num_params)
  if jax.process_index() == 0:
    (workdir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
  return {"workdir": str(workdir), "checkpoint": str(workdir / "checkpoints" / str(last_good)),
          "metrics": str(workdir / "metrics.jsonl"), "tensorboard": str(workdir / "tb"),
          "eval": str(workdir / "eval.json"), "result": result}
