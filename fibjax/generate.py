"""Text generation with the KV caches of ``fibjax.decode``: greedy, temperature and top-k.

The prefill and the chunked decode loop are each jit-compiled once per (model structure, batch,
prompt length, cache length, chunk, sampling settings) and reused across chunks and calls: the
position is a traced scalar, so decoding never recompiles.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fibjax.model import check_token_ids
from fibjax.offsets import check_int

if TYPE_CHECKING:
  from fibjax.model import LM


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
  """``(prefill, steps)`` jitted for one model structure and sampling setting.

  ``prefill(state, prompt_BxP, cache, key) -> (token_B, cache)`` samples the first new token.
  ``steps(state, token_B, pos, cache, key, n) -> (tokens_nxB, cache)`` feeds ``token_B`` at
  position ``pos`` and decodes ``n`` tokens in one ``lax.scan`` (one dispatch per ``n`` tokens;
  ``pos`` is traced, the cache donated). The token sampled from the logits at position ``q``
  uses ``fold_in(key, q)``, so results do not depend on how the steps are chunked.
  """

  @jax.jit
  def prefill(state, prompt_BxP, cache, key):
    logits, cache = nnx.merge(graphdef, state).prefill(prompt_BxP, cache)
    q = prompt_BxP.shape[1] - 1
    return sample(logits[:, -1], jax.random.fold_in(key, q), temperature, top_k), cache

  @functools.partial(jax.jit, static_argnums=(5,), donate_argnums=(3,))
  def steps(state, token_B, pos, cache, key, n):
    model = nnx.merge(graphdef, state)

    def body(carry, q):
      token, cache = carry
      logits, cache = model.decode(token, q, cache)
      token = sample(logits, jax.random.fold_in(key, q), temperature, top_k)
      return (token, cache), token

    (_, cache), tokens = jax.lax.scan(body, (token_B, cache), pos + jnp.arange(n, dtype=jnp.int32))
    return tokens, cache

  return prefill, steps


def stream(model: LM, prompt_BxP: jax.Array, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
           seed: int = 0, chunk: int = 8) -> Iterator[jax.Array]:
  """Yields ``[B]`` int32 tokens one at a time after ``prompt_BxP`` (int32, ``P >= 1``), decoded
  ``chunk`` per compiled call (the last chunk is computed whole and cut, so one compilation
  serves every call with the same shapes).

  Sparse layers keep ``R + 1`` cached positions however long the generation runs; dense layers
  cache the prompt plus the generated positions.
  """
  prompt = np.asarray(prompt_BxP)
  vocab = model.cfg.vocab_size
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be [batch, length >= 1] tokens, got shape {prompt.shape}")
  check_token_ids(prompt, vocab, "prompt")
  for name, value, least in (("max_new_tokens", max_new_tokens, 1), ("chunk", chunk, 1), ("top_k", top_k, 0)):
    check_int(name, value, least)
  if top_k > vocab:
    raise ValueError(f"top_k must be <= the vocabulary ({vocab}), got {top_k}; 0 samples from every token")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
  prompt_BxP = jnp.asarray(prompt, jnp.int32)
  graphdef, state = nnx.split(model)
  prefill, steps = compiled_steps(graphdef, float(temperature), int(top_k))
  b, p = prompt_BxP.shape
  rest = -(-(max_new_tokens - 1) // chunk) * chunk
  cache = model.init_cache(b, p + rest)
  key = jax.random.key(seed)
  token, cache = prefill(state, prompt_BxP, cache, key)
  yield token
  done, pos = 1, p
  while done < max_new_tokens:
    tokens, cache = steps(state, token, jnp.int32(pos), cache, key, chunk)
    for i in range(min(chunk, max_new_tokens - done)):
      yield tokens[i]
    token, pos, done = tokens[-1], pos + chunk, done + chunk


def generate(model: LM, prompt_BxP: jax.Array, max_new_tokens: int, **kwargs: Any) -> jax.Array:
  """``[B, P + max_new_tokens]`` int32: the prompt followed by the generated tokens; ``kwargs`` are
  ``stream``'s (``temperature``, ``top_k``, ``seed``, ``chunk``)."""
  new = list(stream(model, prompt_BxP, max_new_tokens, **kwargs))
  return jnp.concatenate([jnp.asarray(prompt_BxP, jnp.int32)] + [t[:, None] for t in new], axis=1)
