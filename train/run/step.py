"""Pure step functions: loss, the optimizer, the jit-sharded train step and the eval step."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from configs.base import TrainConfig
from train.data.text import SEPARATOR


def document_layout(tokens_BxN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(segment_ids_BxN, positions_BxN)`` int32 of packed documents, each starting at a
  ``SEPARATOR`` token: the segment id counts the separators up to and including each token (the
  tokens before the first, a document begun before the window, are segment 0) and the position
  is the distance to its document's start (the window's start for segment 0)."""
  n = tokens_BxN.shape[1]
  starts_BxN = tokens_BxN == SEPARATOR
  index_N = jnp.arange(n, dtype=jnp.int32)
  start_BxN = jax.lax.cummax(jnp.where(starts_BxN, index_N, 0), axis=1)
  return jnp.cumsum(starts_BxN, axis=1, dtype=jnp.int32), index_N - start_BxN


def token_nll(graphdef: nnx.GraphDef, params: nnx.State, tokens_BxT1: jax.Array,
              pack_documents: bool = False) -> jax.Array:
  """Per-target negative log-likelihood ``[B, T]`` (float32) of ``tokens[:, 1:]``.

  ``pack_documents``: the inputs' documents (``document_layout``) attend only within themselves,
  at positions counted from each document's start; a document's last input still predicts the
  next token (the next document's separator)."""
  model = nnx.merge(graphdef, params)
  inputs_BxT = tokens_BxT1[:, :-1]
  if pack_documents:
    segment_ids_BxT, positions_BxT = document_layout(inputs_BxT)
    logits_BxTxV = model(inputs_BxT, positions_BxT, segment_ids_BxT)
  else:
    logits_BxTxV = model(inputs_BxT)
  logp = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  # The target's log-probability through a one-hot product: the same value, and a gradient that is
  # elementwise where take_along_axis's is a scatter (atomic on GPUs, slow in deterministic mode).
  onehot_BxTxV = jax.nn.one_hot(tokens_BxT1[:, 1:], logp.shape[-1], dtype=logp.dtype)
  return -jnp.sum(logp * onehot_BxTxV, axis=-1)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW, linear warm-up then cosine decay to ``min_lr_ratio * lr``, global-norm clipping.
  Weight decay applies to matrices only (not norms, not alpha)."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1), cfg.lr * cfg.min_lr_ratio
  )
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
  )


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, pack_documents: bool = False,
                    masked: bool = False) -> Callable:
  """``step(state, batch_AxBxT1) -> (state, metrics)``: A micro-batches accumulated by scan,
  one optimizer update. ``state = {"params", "opt_state", "step"}``; ``pack_documents`` as in
  ``token_nll``. ``masked`` (a run with a task): the batch is ``(tokens_AxBxT1 int32,
  mask_AxBxT float32)`` and a micro-batch's loss is the mean over the targets whose mask is 1
  (``train.data.tasks.mixed_dataset``: a text row's are all, a task row's its answer tokens)."""

  def text_loss(params, tokens):
    return jnp.mean(token_nll(graphdef, params, tokens, pack_documents))

  def masked_loss(params, batch):
    tokens_BxT1, mask_BxT = batch
    nll_BxT = token_nll(graphdef, params, tokens_BxT1, pack_documents)
    return jnp.sum(nll_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)

  loss_fn = masked_loss if masked else text_loss

  def step(state: dict[str, Any], batch_AxBxT1: jax.Array):
    params = state["params"]

    def micro(carry, tokens):
      loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    accum = jax.tree.leaves(batch_AxBxT1)[0].shape[0]
    if accum == 1:  # no accumulation: no scan, no zero-filled gradient tree
      loss, grads = jax.value_and_grad(loss_fn)(params, jax.tree.map(lambda x: x[0], batch_AxBxT1))
    else:
      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = jax.lax.scan(micro, zeros, batch_AxBxT1)  # a (tokens, mask) batch: both sliced
      loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
    # the parameter norm is finite iff every new parameter is (barring overflow of the sum): the
    # trainer checks all three before it checkpoints the new state
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(new_params)}

  return step


def make_eval_step(graphdef: nnx.GraphDef, pack_documents: bool = False) -> Callable:
  """``eval(params, tokens_BxL1) -> nll summed over the batch, per position [L]``;
  ``pack_documents`` as in ``token_nll``."""

  def evaluate(params, tokens_BxL1):
    return jnp.sum(token_nll(graphdef, params, tokens_BxL1, pack_documents), axis=0)

  return evaluate
