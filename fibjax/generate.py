"""Text generation with the KV caches of ``fibjax.decode``: greedy, temperature and top-k.

The prefill and the decode step are each jit-compiled once per (model structure, batch,
prompt length, cache length, sampling settings) and reused across steps and calls: the position
is a traced scalar, so the step never recompiles.
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx


def sample(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """Greedy (``temperature == 0``), else temperature sampling, optionally among the top-k logits."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def compiled_steps(graphdef: nnx.GraphDef, temperature: float, top_k: int):
  """``(prefill, step)`` jitted for one model structure and sampling setting.

  ``prefill(state, prompt_BxP, cache, key) -> (token_B, cache)``;
  ``step(state, token_B, pos, cache, key) -> (next_token_B, cache)`` (cache donated).
  """

  @jax.jit
  def prefill(state, prompt_BxP, cache, key):
    logits, cache = nnx.merge(graphdef, state).prefill(prompt_BxP, cache)
    return sample(logits[:, -1], key, temperature, top_k), cache

  @functools.partial(jax.jit, donate_argnums=(3,))
  def step(state, token_B, pos, cache, key):
    logits, cache = nnx.merge(graphdef, state).decode(token_B, pos, cache)
    return sample(logits, key, temperature, top_k), cache

  return prefill, step


def stream(model, prompt_BxP: jax.Array, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
           seed: int = 0) -> Iterator[jax.Array]:
  """Yields ``[B]`` int32 tokens one step at a time after ``prompt_BxP`` (int32, ``P >= 1``).

  Sparse layers keep ``R + 1`` cached positions however long the generation runs; dense layers
  cache ``P + max_new_tokens`` positions.
  """
  prompt_BxP = jnp.asarray(prompt_BxP, jnp.int32)
  if prompt_BxP.ndim != 2 or prompt_BxP.shape[1] < 1:
    raise ValueError(f"prompt must be [batch, length >= 1] tokens, got shape {prompt_BxP.shape}")
  if temperature < 0 or top_k < 0:
    raise ValueError(f"temperature and top_k must be >= 0, got {temperature}, {top_k}")
  graphdef, state = nnx.split(model)
  prefill, step = compiled_steps(graphdef, float(temperature), int(top_k))
  b, p = prompt_BxP.shape
  cache = model.init_cache(b, p + max_new_tokens)
  keys = jax.random.split(jax.random.key(seed), max_new_tokens + 1)
  token, cache = prefill(state, prompt_BxP, cache, keys[0])
  for i in range(max_new_tokens):
    yield token
    if i + 1 < max_new_tokens:
      token, cache = step(state, token, jnp.int32(p + i), cache, keys[i + 1])


def generate(model, prompt_BxP: jax.Array, max_new_tokens: int, **kwargs) -> jax.Array:
  """``[B, P + max_new_tokens]``: the prompt followed by the generated tokens (see ``stream``)."""
  new = list(stream(model, prompt_BxP, max_new_tokens, **kwargs))
  return jnp.concatenate([jnp.asarray(prompt_BxP, jnp.int32)] + [t[:, None] for t in new], axis=1)
