"""The recall probe (train.probe.recall): accuracy by distance from hand-built models that can and
cannot reach a distance, the reach columns, files never overwritten; the recipes of the studies;
stretched-offset budgets; the dense sink-window evaluation; the deterministic mode's flags."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from configs.base import apply_overrides
from configs.tasks import TaskSpec
from fibjax.layers import LayerPattern
from train.data import tasks, text as data
from train.probe import budget, recall, reach
from train.run import xla_flags
from train.run.restore import load_run
from train.run.trainer import train
from tests.compile_cache import host_devices_env, optimized_env

BYTE = data.ByteTokenizer()
TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.head_dim=16", "model.mlp_dim=64",
        "model.seq_len=128", "model.window=8", "batch_size=8", "steps=2", "log_every=1", "eval_every=100",
        "checkpoint_every=100", "final_eval_tokens=256", "final_eval_multiples=1,2", "eval_batches=1",
        "progress=false", "task=mqar", "task_queries=2"]


def copy_from(distance: int):
  """A hand-built model that attends to exactly one relative distance: its prediction for target
  ``t`` (token ``t + 1``) is the token ``distance`` back from it. It answers an associative-recall
  query right exactly when the pair lies ``distance`` tokens back."""

  def fn(params, tokens_BxL1):
    tokens = np.asarray(tokens_BxL1)
    preds = np.zeros_like(tokens[:, 1:])
    preds[:, distance - 1:] = tokens[:, :tokens.shape[1] - distance]
    return jnp.asarray(preds)

  return lambda graphdef: fn


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A 2-step fib-linear run trained on mqar (its weights do not matter: the probes swap the model)."""
  workdir = tmp_path_factory.mktemp("recall") / "run"
  train(apply_overrides(configs.get_config("tiny"), TINY).validate(), workdir)
  return workdir


@pytest.mark.parametrize("seed", [0, 5])
def test_a_model_recalls_exactly_the_distance_it_reaches(seed):
  spec = TaskSpec("mqar", 256, "grid:40,80,120", pairs=6, queries=2).validate()
  batch = tasks.task_batch(spec, BYTE.encode, seed, range(32))
  for reached in (40, 80, 120):
    preds = np.asarray(copy_from(reached)(None)(None, batch.tokens_BxT1))
    rows = tasks.accuracy_by_distance(tasks.score(preds, batch.tokens_BxT1, batch.answers), batch.answers.distance)
    assert {r["distance"]: r["accuracy"] for r in rows} == {d: float(d == reached) for d in (40, 80, 120)}


def test_recall_reads_accuracy_by_distance_beside_the_reach(run_dir, monkeypatch):
  run = load_run(run_dir)
  spec = run.cfg.task_spec()
  monkeypatch.setattr(recall, "predict_fn", copy_from(100))
  record = recall.recall(run, spec, (1, 2), samples=16)
  for m in (1, 2):
    r = record[f"{m}x"]
    assert r["length"] == 128 * m and r["answers"] == 32
    for row in r["by_distance"]:
      lo, hi = row["distance"]
      assert (row["accuracy"] > 0) <= (lo <= 100 < hi)  # only the bucket holding 100 can be right
      assert 0 <= row["one_hop"] <= row["layers"] <= 1
  patterns = [b.attn.pattern for b in __import__("flax").nnx.merge(run.graphdef, run.params).blocks]
  first = record["1x"]["by_distance"][0]
  w = patterns[0].window
  if first["distance"][1] <= w:  # a bucket inside the window is reached in one hop
    assert first["one_hop"] == 1.0


def test_reach_columns_of_hand_built_patterns():
  """Answer distances [1, 16), [16, 32), [32, 64) are read at relative distances [0, 15), [15, 31), [31, 63)."""
  edges = [1, 16, 32, 64]
  window_only = [np.arange(8), np.arange(8)]
  assert [r["layers"] for r in recall.reach_by_bucket(window_only, edges)] == [1.0, 0.0, 0.0]  # 0..14 = 2 x 7
  assert [r["one_hop"] for r in recall.reach_by_bucket(window_only, edges)] == [8 / 15, 0.0, 0.0]  # 0..7
  offsets = [np.array([0, 1, 40]), np.array([0, 1])]
  cols = recall.reach_by_bucket(offsets, edges)
  assert cols[2]["one_hop"] == 1 / 32 and cols[2]["layers"] == 2 / 32  # 40 and 41: answer distances 41 and 42
  assert recall.reach_by_bucket([None], edges)[2] == {"one_hop": 1.0, "layers": 1.0}
  assert reach.reachable(offsets, 64)[[40, 41, 42]].tolist() == [True, True, False]


def test_an_answer_distance_is_reached_one_token_short_of_it():
  """An answer at distance d is predicted d - 1 tokens after its value (``train.data.tasks``): an
  offset at exactly d - 1 reaches it, one at exactly d (nothing at d - 1) does not."""
  edges = [40, 41, 42]  # answer distances 40 and 41
  at_39, at_40 = [reach.with_window(8, [39])], [reach.with_window(8, [40])]
  assert recall.reach_by_bucket(at_39, edges) == [{"one_hop": 1.0, "layers": 1.0}, {"one_hop": 0.0, "layers": 0.0}]
  assert recall.reach_by_bucket(at_40, edges) == [{"one_hop": 0.0, "layers": 0.0}, {"one_hop": 1.0, "layers": 1.0}]
  # through two layers: the window's 0..7 then 40 spans 40..47, answer distances 41..48
  two = [np.arange(8), reach.with_window(8, [40])]
  assert [r["layers"] for r in recall.reach_by_bucket(two, [40, 41, 49, 50])] == [0.0, 1.0, 0.0]


def test_the_probe_at_longer_lengths_keeps_the_task_and_spans_the_length():
  spec = TaskSpec("mqar", 512, queries=4).validate()
  longer = recall.spec_at(spec, 2048)
  assert (longer.name, longer.queries, longer.pairs, longer.keys) == ("mqar", 4, spec.pair_count, spec.keys)
  assert longer.law.lo == spec.law.lo and longer.law.hi == 2048 - (spec.seq_len - spec.law.hi)
  assert recall.bucket_edges(460) == [1, 16, 32, 64, 128, 256, 512]
  assert recall.distance_edges(longer) == recall.bucket_edges(longer.longest)


def test_a_grid_of_distances_is_probed_as_trained_at_every_length():
  spec = TaskSpec("mqar", 512, distance="grid:100,148,320", queries=4).validate()
  longer = recall.spec_at(spec, 2048)
  assert longer.law == spec.law and longer.seq_len == 2048
  assert recall.distance_edges(longer) == [100, 101, 148, 149, 320, 321]
  # window 32 in both layers, offsets 99 and 300 in the second: one hop reaches 99 (answer distance
  # 100); through the layers 0..62, 99..130 and 300..331 (so 319: answer distance 320, not 148)
  hops = [np.arange(32), np.concatenate([np.arange(32), [99, 300]])]
  cols = recall.reach_by_bucket(hops, recall.distance_edges(longer))[::2]
  assert [c["one_hop"] for c in cols] == [1.0, 0.0, 0.0] and [c["layers"] for c in cols] == [1.0, 0.0, 1.0]
  sample = tasks.TaskGenerator(longer, BYTE.encode).sample(0, 0)
  assert set(sample.distances.tolist()) <= {100, 148, 320}


def test_recall_cli_writes_once_and_refuses_what_does_not_apply(run_dir):
  cmd = [sys.executable, "-m", "train.recall", "--workdir", str(run_dir), "--samples", "4", "--lengths", "1"]
  first = subprocess.run(cmd, capture_output=True, text=True)
  assert first.returncode == 0, first.stderr[-2000:]
  assert "recall" in first.stdout and "wrote" in first.stdout
  written = list((run_dir / "recall").glob("*.json"))
  assert len(written) == 1 and json.loads(written[0].read_text())["1x"]["answers"] == 8
  again = subprocess.run(cmd, capture_output=True, text=True)
  assert again.returncode == 0 and "reused" in again.stdout
  sink = subprocess.run(cmd + ["--sink-window"], capture_output=True, text=True)
  assert sink.returncode == 2 and sink.stderr.count("\n") == 1 and "dense" in sink.stderr
  bad = subprocess.run(cmd[:-2] + ["--lengths", "0"], capture_output=True, text=True)
  assert bad.returncode == 2 and "--lengths" in bad.stderr


def test_the_cpu_recall_grid_holds_one_distance_per_set_of_patterns_reaching_it():
  """``recall128``'s docstring: which patterns reach each grid distance through both layers (and
  the distances one token either side alike), computed from the models the recipe builds."""
  from configs.recall import GRID128  # noqa: PLC0415
  from fibjax.model import LM  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  stated = {27: {"fib-fixed", "fib-linear"}, 52: {"fib-linear"}, 65: {"pow2-fixed"},
            70: {"fib-linear", "pow2-fixed"}, 92: {"fib-fixed"}, 100: set()}
  reaches = {}
  for variant in ("fib-fixed", "fib-linear", "pow2-fixed"):
    cfg = configs.get_config("recall128", variant)
    ok = reach.reachable(reach.hop_sets(LM(cfg.model, rngs=nnx.Rngs(0))), 128)
    reaches[variant] = {d for d in GRID128 if ok[d - 1] and ok[d] and ok[d + 1]}
    assert all(ok[d - 1] == ok[d] == ok[d + 1] for d in GRID128), variant
  assert {d: {v for v in reaches if d in reaches[v]} for d in GRID128} == stated
  spec = configs.get_config("recall128").task_spec()
  assert spec.law.values == GRID128 and recall.spec_at(spec, 512).law.values == GRID128
  short, long = configs.get_config("recall128"), configs.get_config("recall128-long")
  assert (long.lr, long.steps) == (1e-3, 12000)  # the model, the task and the rest of the recipe are recall128's
  assert dataclasses.replace(long, lr=short.lr, steps=short.steps, eval_every=short.eval_every,
                             checkpoint_every=short.checkpoint_every) == short


def test_stretched_budgets_move_offsets_and_reach():
  p = LayerPattern("static", window=8, reach=128, offsets=(8, 13, 21))
  assert budget.cheaper(p, "stretch-2") == dataclasses.replace(p, offsets=(16, 26, 42), reach=256)
  assert budget.cheaper(p, "stretch-4").offsets == (32, 52, 84)
  learned = LayerPattern("learned", window=8, reach=128, terms=(8, 13))
  assert budget.cheaper(learned, "stretch-4") == dataclasses.replace(learned, terms=(32, 52), reach=512)


def test_study_recipes_state_their_reach():
  for name, layers in (("recall", 2), ("recall8", 8)):
    cfg = configs.get_config(name).validate()
    assert cfg.task == "mqar" and cfg.model.num_layers == layers and cfg.model.seq_len == 512
  starved = configs.get_config("starved").validate()
  assert starved.model.num_layers * (starved.model.window - 1) <= starved.model.seq_len // 4


def test_deterministic_mode_adds_its_flag_once(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
  xla_flags.apply_defaults(deterministic=True)
  xla_flags.apply_defaults(deterministic=True)
  flags = os.environ["XLA_FLAGS"].split()
  assert flags.count("--xla_gpu_deterministic_ops=true") == 1 and "--xla_foo=1" in flags
  with pytest.raises(ValueError, match="deterministic"):
    apply_overrides(configs.get_config("tiny"), ["deterministic=maybe"])
  with pytest.raises(ValueError, match="eval_window"):
    apply_overrides(configs.get_config("tiny"), ["model.variant=dense", "model.eval_window=128"]).validate()


@pytest.mark.parametrize("variant", ["fib-linear", "fib-learned", "dense"])
def test_the_train_step_holds_no_scatter_on_the_kernel_path(variant):
  """XLA's deterministic mode makes a scatter slow (sorted, serial adds); on the GPU path (the
  Pallas kernels, here traced in interpret mode) the train step holds none: the loss picks the
  target's log-probability by a one-hot product, whose gradient is elementwise."""
  from train.run.mesh import make_mesh
  from train.run.step import make_optimizer, make_train_step
  from train.run.trainer import init_state

  impl = ["model.interpret=true", "model.attention_impl=pallas"] if variant != "dense" else []
  cfg = apply_overrides(configs.get_config("tiny"), [f"model.variant={variant}", "model.d_model=32",
                                                     "model.num_layers=1", *impl]).validate()
  mesh, tx = make_mesh(-1, 1), make_optimizer(cfg)
  with jax.set_mesh(mesh):
    graphdef, state = init_state(cfg, mesh, tx)
    jaxpr = str(jax.make_jaxpr(make_train_step(graphdef, tx))(state, jnp.zeros((1, 8, 129), jnp.int32)))
  assert "scatter" not in jaxpr
  assert ("pallas_call" in jaxpr) == (variant != "dense")


def test_a_task_sweep_runs_through_its_probes_and_the_report(tmp_path):
  """A tiny sweep on mqar (dense and the window control, one seed): each cell is probed by its
  recall (dense also with the sink window, no text probes), and the report judges it on recall."""
  root = tmp_path / "root"
  # XLA's usual optimisation: the cells' probes compute over hundreds of sequences, on every device
  # of the mesh, so on 2 simulated devices (tests.compile_cache)
  env = host_devices_env(optimized_env({**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}))
  sweep = subprocess.run([sys.executable, "-m", "train.sweep", "--root", str(root), "--config", "tiny", "--variants",
                          "dense", "window", "--seeds", "0", "--no-latency", "--set", *TINY,
                          "final_eval_multiples=1,4"],
                         capture_output=True, text=True, timeout=900, env=env)
  assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
  dense = json.loads((root / "dense-s0" / "cell.json").read_text())["files"]
  window = json.loads((root / "window-s0" / "cell.json").read_text())["files"]
  assert set(dense) == {"eval", "recall", "recall:sink"} and set(window) == {"eval", "recall"}
  probe = json.loads((root / "dense-s0" / dense["recall:sink"]).read_text())
  assert probe["sinks"] == 4 and probe["multiples"] == [1, 4]
  rep = subprocess.run([sys.executable, "-m", "train.report", str(root)], capture_output=True, text=True,
                       timeout=600, env=env)
  assert rep.returncode == 0, rep.stderr[-2000:]
  text = (root / "report.md").read_text()
  assert "Recall by distance" in text and "Validity checks" in text and "recall error" in text
