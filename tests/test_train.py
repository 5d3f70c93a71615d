"""Training system tests on 8 simulated CPU devices (tests/conftest.py sets XLA_FLAGS)."""

import dataclasses
import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import configs
from train.run import checkpoint
from train.data import text as data
from configs.base import TrainConfig, apply_overrides
from train.run.step import make_optimizer
from train.run.restore import abstract_params, restore_params
from train.run.trainer import compile_train_step, global_batch, init_state, make_mesh
from tests.compile_cache import cached_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.head_dim=16", "model.mlp_dim=64",
        "model.seq_len=64", "model.window=8", "batch_size=16", "final_eval_tokens=512", "eval_batches=1",
        "progress=false"]


def _cfg(*overrides) -> TrainConfig:
  return apply_overrides(configs.get_config("tiny"), FAST + list(overrides)).validate()


def _run(workdir, *overrides, extra=(), timeout=300):
  """``python -m train`` on the tiny recipe, sharing compiled programs with the other runs
  (``tests.compile_cache``)."""
  cmd = [sys.executable, "-m", "train", "--workdir", str(workdir), *extra, "--set", *FAST, *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=cached_env())


def _records(workdir) -> list[dict]:
  """metrics.jsonl as strict JSON (NaN or Infinity in it fails the test)."""
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) for line in lines]


def _losses(workdir) -> dict[int, float]:
  """The loss of each step; a step recorded twice fails the test."""
  steps = [r["step"] for r in _records(workdir) if "loss" in r and "event" not in r]
  assert len(steps) == len(set(steps)), f"a step is recorded more than once: {steps}"
  return {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r and "event" not in r}


def test_eight_devices_present():
  assert jax.device_count() == 8


@pytest.mark.parametrize("norm_impl", ["xla", "pallas"])  # pallas (interpret mode): the Pallas norms, per batch shard
def test_sharded_step_equals_single_device_step(norm_impl):
  cfg = _cfg("mesh_fsdp=2", f"model.norm_impl={norm_impl}", "model.attention_impl=xla", "model.interpret=true")
  tx = make_optimizer(cfg)
  tokens = data.tokenize(data.load_documents()[:3], data.ByteTokenizer())
  batches = [np.stack([tokens[i * 65 + j * 1000 : i * 65 + j * 1000 + 65] for j in range(16)]) for i in range(3)]
  results = []
  for mesh in (make_mesh(-1, 2), make_mesh(devices=jax.devices()[:1])):
    with jax.set_mesh(mesh):
      graphdef, state = init_state(cfg, mesh, tx)
      step = compile_train_step(graphdef, tx, state, mesh)
      losses = []
      for b in batches:
        state, m = step(state, global_batch(b, 1, mesh))
        losses.append(float(m["loss"]))
      results.append((losses, jax.tree.map(np.asarray, state["params"])))
  (l8, p8), (l1, p1) = results
  np.testing.assert_allclose(l8, l1, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), p8, p1)


def test_restore_onto_a_different_mesh(tmp_path):
  cfg = _cfg()
  tx = make_optimizer(cfg)
  mesh_a = make_mesh(4, 2)
  with jax.set_mesh(mesh_a):
    _, state_a = init_state(cfg, mesh_a, tx)
  mngr = checkpoint.manager(tmp_path, cfg)
  checkpoint.save(mngr, 5, state_a, {"next_index": 7}, force=True)
  mngr.wait_until_finished()
  mesh_b = make_mesh(devices=jax.devices()[:2])
  with jax.set_mesh(mesh_b):
    _, fresh = init_state(dataclasses.replace(cfg, seed=99), mesh_b, tx)
    restored, data_state = checkpoint.restore(mngr, 5, fresh)
  mngr.close()
  assert data_state == {"next_index": 7}
  kernel = restored["params"]["blocks"][0]["mlp"]["down"]["kernel"]
  assert kernel[...].sharding.mesh.devices.size == 2
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state_a)


def test_pipeline_is_deterministic_and_heldout_is_disjoint():
  docs = data.load_documents()
  train_docs, heldout_docs = data.split_documents(docs)
  assert {d["id"] for d in train_docs}.isdisjoint({d["id"] for d in heldout_docs})
  assert len(heldout_docs) > 10 and len(train_docs) > 100
  tokens = data.tokenize(train_docs[:5], data.ByteTokenizer())
  take = lambda seed: [next(it) for it in [iter(data.train_dataset(tokens, 64, 8, seed))] for _ in range(5)]  # noqa
  a, b, c = take(0), take(0), take(1)
  assert all((x == y).all() for x, y in zip(a, b))
  assert not all((x == y).all() for x, y in zip(a, c))
  # iterator state round trip
  it = iter(data.train_dataset(tokens, 64, 8, 0))
  next(it)
  state = it.get_state()
  want = next(it)
  it2 = iter(data.train_dataset(tokens, 64, 8, 0))
  it2.set_state(state)
  assert (next(it2) == want).all()


def test_user_text_and_jsonl_readers(tmp_path):
  (tmp_path / "a.txt").write_text("hello world " * 50)
  (tmp_path / "b.jsonl").write_text(json.dumps({"text": "first doc"}) + "\n" + json.dumps({"text": "second"}) + "\n")
  docs = data.load_documents(str(tmp_path))
  assert [d["text"] for d in docs][1:] == ["first doc", "second"]
  (tmp_path / "bad.jsonl").write_text("{not json}\n")
  with pytest.raises(ValueError, match="bad.jsonl:1"):
    data.load_documents(str(tmp_path / "bad.jsonl"))


def test_bpe_tokenizer_round_trip():
  docs = data.load_documents()[:4]
  tok = data.BPETokenizer.train(docs, 512)
  assert tok.vocab_size == 512
  text = "Fellow-Citizens of the Senate"
  assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode(text)) < len(text.encode())


def test_killed_run_resumes_exactly(tmp_path):
  common = ["steps=12", "checkpoint_every=4", "log_every=1", "eval_every=100"]
  full = _run(tmp_path / "full", *common)
  assert full.returncode == 0, full.stderr[-3000:]
  cmd = [sys.executable, "-m", "train", "--workdir", str(tmp_path / "cut"), "--set", *FAST, *common]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = tmp_path / "cut" / "checkpoints" / "8"
  deadline = time.time() + 240
  while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert ckpt.exists(), "the run ended before its step-8 checkpoint: test cannot kill it mid-way"
  assert not (tmp_path / "cut" / "eval.json").exists()  # it really was cut short
  resumed = _run(tmp_path / "cut")  # no config flags: resumes with the saved config
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  full_losses, cut_losses = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
  assert sorted(cut_losses) == list(range(1, 13))  # each step once, though steps 9.. ran twice
  assert cut_losses == full_losses  # bit-exact
  events = [json.loads(x).get("event") for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
  assert "resume" in events


def test_nonfinite_step_stops_before_its_checkpoint(tmp_path):
  """lr=1e30 on a run with checkpoints: the first non-finite step stops the run before it is
  saved, the message names the last finite checkpoint, and no NaN is saved or logged."""
  first = _run(tmp_path / "nan", "steps=4", "checkpoint_every=2", "log_every=1")
  assert first.returncode == 0, first.stderr[-3000:]
  res = _run(tmp_path / "nan", "steps=20", "lr=1e30", "checkpoint_every=1", "log_every=1",
             extra=["--allow-change", "lr"])
  assert res.returncode == 2, res.stderr[-3000:]
  error = res.stderr.strip().splitlines()[-1]
  assert "is not finite" in error and f"last finite checkpoint, step 4 in {tmp_path / 'nan' / 'checkpoints'}" in error
  assert "--set lr=1e+29 --allow-change lr" in error  # the advice is a command that resumes
  saved = sorted(int(p.name) for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit())
  assert saved[-1] == 4
  _losses(tmp_path / "nan")  # strict JSON, each step once
  fresh = _run(tmp_path / "fresh", "steps=20", "lr=1e30", "warmup_steps=1", "checkpoint_every=1", "grad_clip=1e30")
  assert fresh.returncode == 2 and "is not finite" in fresh.stderr and "step None" not in fresh.stderr
  for step in sorted(int(p.name) for p in (tmp_path / "fresh" / "checkpoints").iterdir() if p.name.isdigit()):
    params = restore_params(tmp_path / "fresh" / "checkpoints", step, _abstract_params())
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), f"step {step} holds NaN"


def _abstract_params():
  cfg = _cfg()
  return abstract_params(cfg, make_mesh(devices=jax.devices()[:1]))[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variant", "fib-sparse"], "variant"),
        (["--data", "/no/such/corpus.txt"], "data_path"),
        (["--set", "model.windoww=3"], "unknown model field"),
        (["--set", "steps=abc"], "steps"),
        (["--config", "huge"], "unknown config"),
    ],
)
def test_bad_configs_fail_clearly(tmp_path, args, message):
  res = subprocess.run([sys.executable, "-m", "train", "--workdir", str(tmp_path / "w"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
  assert not (tmp_path / "w").exists()  # nothing written


def test_incompatible_workdir_is_refused_and_untouched(tmp_path):
  first = _run(tmp_path / "w", "steps=2", "checkpoint_every=1")
  assert first.returncode == 0, first.stderr[-3000:]
  before = {p: p.stat().st_mtime_ns for p in (tmp_path / "w").rglob("*")}
  res = subprocess.run([sys.executable, "-m", "train", "--config", "tiny", "--workdir", str(tmp_path / "w"),
                        "--set", *FAST, "model.d_model=64"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert res.returncode == 2 and "incompatible" in res.stderr and "model.d_model" in res.stderr
  after = {p: p.stat().st_mtime_ns for p in (tmp_path / "w").rglob("*")}
  assert before == after


def test_gradient_accumulation_equals_one_big_batch():
  tokens = data.tokenize(data.load_documents()[:3], data.ByteTokenizer())
  batch = np.stack([tokens[j * 1000 : j * 1000 + 65] for j in range(16)])
  out = []
  for accum in (1, 2):
    cfg = _cfg(f"grad_accum={accum}")
    tx = make_optimizer(cfg)
    mesh = make_mesh(devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
      graphdef, state = init_state(cfg, mesh, tx)
      state, m = compile_train_step(graphdef, tx, state, mesh)(state, global_batch(batch, accum, mesh))
      out.append((float(m["loss"]), jax.tree.map(np.asarray, state["params"])))
  np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), out[0][1], out[1][1])


def test_ci_runs_the_readme_commands():
  """.ci/run runs the README's install and test commands verbatim, and nothing else."""
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  commands = [line for line in ci if line and not line.startswith(("#", "set ", "cd "))]
  readme_code = {line.strip() for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("    ")}
  assert commands == ['pip install -e ".[test]"', "python -m pytest -n 2 --dist loadfile -q tests"]
  assert set(commands) <= readme_code
