"""The attention kernels' configuration: a device's tuned table is read before the heuristic, a
missing table leaves the heuristic to decide silently, an unusable one with one warning line;
``benchmarks.tune_attention --write-table`` merges into a table and says what changed."""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import tune_attention
from pallas_kernels import BackwardConfig, ForwardConfig, gathered_offset_attention
from pallas_kernels.attention import config
from pallas_kernels.attention.ops import attention_problem

Q = jax.ShapeDtypeStruct((1, 64, 2, 16), jnp.float32)
OFFSETS = np.asarray([9, 13], np.int32)
TUNED = ForwardConfig(block=16, term_mma=False, term_flow="unbranched", num_warps=2, num_stages=3)


def _problem():
  return attention_problem(Q, Q, OFFSETS, window=8, backend="gpu")


def _heuristic():
  return config.default_forward(_problem()), config.default_backward(_problem())


def _write(path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def _table(entry: dict) -> str:
  return json.dumps({"device": "Test GPU", "entries": {_problem().key: entry}})


def _forward_jaxpr(**configs) -> str:
  f = lambda q: gathered_offset_attention(q, q, q, window=8, offsets=jnp.asarray(OFFSETS), interpret=True,  # noqa: E731
                                          backend="gpu", **configs)
  return str(jax.make_jaxpr(f)(jnp.zeros(Q.shape, Q.dtype)))


def test_the_heuristic_decides_without_a_table(tmp_path):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert config.choose(_problem(), "Test GPU", tmp_path) == _heuristic()


def test_a_tuned_entry_is_read_before_the_heuristic(tmp_path, monkeypatch):
  """An entry for the problem on this device decides its pass (here the forward); the other pass
  and other problems stay the heuristic's. The kernels read the table when no config is given."""
  _write(config.table_path("Test GPU", tmp_path), _table({"forward": dataclasses.asdict(TUNED), "source": "t.json"}))
  assert config.choose(_problem(), "Test GPU", tmp_path) == (TUNED, _heuristic()[1])
  other = dataclasses.replace(_problem(), n=128)
  assert config.choose(other, "Test GPU", tmp_path) == (config.default_forward(other), config.default_backward(other))
  assert config.choose(_problem(), "Other GPU", tmp_path) == _heuristic()

  monkeypatch.setattr(config, "TUNED_DIR", tmp_path)
  _write(config.table_path(jax.devices()[0].device_kind, tmp_path), _table({"forward": dataclasses.asdict(TUNED)}))
  assert _forward_jaxpr() == _forward_jaxpr(config=TUNED) != _forward_jaxpr(config=_heuristic()[0])


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"device": "Test GPU"}', '{"entries": {"k": 3}}'])
def test_an_unreadable_table_falls_back_with_one_warning(tmp_path, text):
  path = config.table_path("Test GPU", tmp_path)
  _write(path, text)
  with pytest.warns(config.TunedTableWarning) as record:
    assert config.choose(_problem(), "Test GPU", tmp_path) == _heuristic()
    assert config.choose(_problem(), "Test GPU", tmp_path) == _heuristic()  # read once per file version
  assert len(record) == 1
  message = str(record[0].message)
  assert str(path) in message and "heuristic" in message and "\n" not in message


@pytest.mark.parametrize("forward", [dict(dataclasses.asdict(TUNED), term_flow="sideways"),
                                     dict(dataclasses.asdict(TUNED), block=0),
                                     {k: v for k, v in dataclasses.asdict(TUNED).items() if k != "num_stages"},
                                     dict(dataclasses.asdict(TUNED), loop_group=True)])
def test_an_invalid_entry_falls_back_with_one_warning(tmp_path, forward):
  backward = dataclasses.replace(_heuristic()[1], num_warps=8)
  _write(config.table_path("Test GPU", tmp_path), _table({"forward": forward,
                                                          "backward": dataclasses.asdict(backward)}))
  with pytest.warns(config.TunedTableWarning) as record:
    assert config.choose(_problem(), "Test GPU", tmp_path) == (_heuristic()[0], backward)
  assert len(record) == 1 and "forward" in str(record[0].message) and "\n" not in str(record[0].message)


def test_configs_are_checked_when_made_and_passed():
  with pytest.raises(ValueError, match="term_flow"):
    ForwardConfig(block=64, term_mma=True, term_flow="looping", num_warps=4, num_stages=2)
  with pytest.raises(ValueError, match="num_warps"):
    dataclasses.replace(TUNED, num_warps=0)
  with pytest.raises(ValueError, match="saved_terms"):
    BackwardConfig(block=64, term_mma=True, term_flow="branched", loop_group=False, saved_terms=1, num_warps=4,
                   num_stages=2)
  q = jnp.zeros(Q.shape, Q.dtype)
  with pytest.raises(TypeError, match="config_bwd a BackwardConfig"):
    gathered_offset_attention(q, q, q, window=8, offsets=jnp.asarray(OFFSETS), interpret=True, config_bwd=TUNED)


def test_write_entry_merges_and_says_what_changed(tmp_path):
  path = tmp_path / "tuned" / "Test_GPU.json"
  forward, backward = _heuristic()
  assert config.write_entry(path, "Test GPU", "a", {"forward": forward}, {"source": "1.json"}) == [
      f"a forward: added {dataclasses.asdict(forward)}"]
  config.write_entry(path, "Test GPU", "b", {"backward": backward}, {"source": "2.json"})
  lines = config.write_entry(path, "Test GPU", "a", {"forward": dataclasses.replace(forward, num_warps=8),
                                                     "backward": backward}, {"source": "3.json"})
  assert lines == ["a forward: num_warps 4 -> 8", f"a backward: added {dataclasses.asdict(backward)}"]
  assert config.write_entry(path, "Test GPU", "b", {"backward": backward}, {}) == ["b backward: unchanged"]
  entries = json.loads(path.read_text())["entries"]
  assert entries["a"]["source"] == "3.json" and entries["a"]["forward"]["num_warps"] == 8
  assert entries["b"] == {"backward": dataclasses.asdict(backward), "source": "2.json"}
  path.write_text("[]")
  with pytest.raises(ValueError, match="not a tuned-config table"):
    config.write_entry(path, "Test GPU", "a", {"forward": forward}, {})
  assert path.read_text() == "[]"


def test_tune_writes_a_pass_only_where_it_beat_the_default():
  forward, backward = _heuristic()
  rows = [{"part": "fwd", **dataclasses.asdict(forward), "fwd_ms": 1.0},
          {"part": "fwd", **dataclasses.asdict(TUNED), "fwd_ms": 0.8},
          {"part": "fwd", **dataclasses.asdict(TUNED), "fwd_ms": "error: does not compile"},
          {"part": "bwd", **dataclasses.asdict(backward), "fwd_bwd_ms": 2.0},
          {"part": "default", "fwd_ms": 1.0, "fwd_bwd_ms": 2.0}]
  best, kept = tune_attention.winners(rows, min_gain=0.05)
  assert best == {"forward": TUNED} and len(kept) == 1 and kept[0].startswith("backward: kept")
  best, kept = tune_attention.winners(rows, min_gain=0.25)
  assert best == {} and [line.split(":")[0] for line in kept] == ["forward", "backward"]
