"""Packed documents: segment ids and positions from the separators, the loss of a packed window
equals each document's alone, and the trainer runs with ``pack_documents=true``."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
import fibjax
from configs.base import TrainConfig, apply_overrides
from train.run import trainer
from train.data.text import SEPARATOR
from train.run.step import document_layout, make_eval_step, token_nll

SMALL = dict(d_model=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64, seq_len=32, window=4)
# where documents start in a 41-token window: a document begun before the window (0..2), a
# one-token document (13), a document longer than the window W and the largest offset, and one
# cut off by the window's end
DOCUMENT_STARTS = (3, 13, 14, 38)


def test_document_layout_counts_separators_and_restarts_positions():
  s = SEPARATOR
  tokens = jnp.asarray([[5, 6, s, 7, 8, s, s, 9], [s, 1, 2, 3, s, 4, 5, 6]], jnp.int32)
  segment_ids, positions = document_layout(tokens)
  np.testing.assert_array_equal(np.asarray(segment_ids), [[0, 0, 1, 1, 1, 2, 3, 3], [1, 1, 1, 1, 2, 2, 2, 2]])
  np.testing.assert_array_equal(np.asarray(positions), [[0, 1, 0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 0, 1, 2, 3]])
  assert segment_ids.dtype == positions.dtype == jnp.int32


def _packed_window(rows: int, seed: int) -> np.ndarray:
  """``[rows, 41]`` int32: random text tokens with separators at ``DOCUMENT_STARTS``."""
  tokens = np.random.default_rng(seed).integers(1, 256, (rows, 41)).astype(np.int32)
  tokens[:, list(DOCUMENT_STARTS)] = SEPARATOR
  return tokens


@pytest.mark.parametrize("variant, impl, kv_heads", [
    ("dense", "xla", None), ("fib-linear", "xla", 1), ("fib-learned", "pallas", None)])
def test_packed_loss_equals_each_document_alone(variant, impl, kv_heads):
  """Each target's NLL in a packed window equals that of its document run alone from position 0
  (followed by the next document's separator, the target of its last token); ``pallas``: the
  kernel in interpret mode."""
  cfg = fibjax.ModelConfig(variant=variant, **SMALL, num_kv_heads=kv_heads, attention_impl=impl, norm_impl="xla",
                           interpret=True)
  graphdef, params = nnx.split(fibjax.LM(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.asarray(_packed_window(2, 1))
  packed = np.asarray(token_nll(graphdef, params, tokens, pack_documents=True))
  bounds = (0, *DOCUMENT_STARTS, tokens.shape[1] - 1)
  for start, end in zip(bounds[:-1], bounds[1:]):
    alone = token_nll(graphdef, params, tokens[:, start:end + 1])
    np.testing.assert_allclose(packed[:, start:end], np.asarray(alone), atol=1e-5, err_msg=f"document {start}:{end}")
  unpacked = np.asarray(token_nll(graphdef, params, tokens))
  assert not np.allclose(packed[:, DOCUMENT_STARTS[0]:], unpacked[:, DOCUMENT_STARTS[0]:], atol=1e-3)
  np.testing.assert_allclose(np.asarray(make_eval_step(graphdef, pack_documents=True)(params, tokens)),
                             packed.sum(axis=0), rtol=1e-6)


def test_trainer_runs_with_packed_documents(tmp_path):
  overrides = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
               "model.head_dim=16", "model.mlp_dim=64", "model.seq_len=64", "model.window=8", "batch_size=8",
               "final_eval_tokens=256", "final_eval_multiples=1,2", "eval_batches=1", "progress=false", "steps=2",
               "log_every=1", "eval_every=2", "checkpoint_every=2", "pack_documents=true"]
  cfg = apply_overrides(configs.get_config("tiny"), overrides).validate()
  assert cfg.pack_documents and cfg.model.num_kv_heads == 1
  trainer.train(cfg, tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r and "event" not in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert any(np.isfinite(r.get("heldout_loss", np.nan)) for r in records)
  assert np.isfinite(json.loads((tmp_path / "eval.json").read_text())["2x"]["loss"])
  assert TrainConfig.load(tmp_path / "config.json").pack_documents
