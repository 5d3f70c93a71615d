"""The experiments end to end on CPU: sweep -> train, evaluate, passkey, budget, latency -> report."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import configs
from configs.base import apply_overrides
from train.data import text as data
from train.data.ood import ood_paths
from train.probe import passkey, reach
from train.run import evaluation
from train.study import report, stats
from tests.compile_cache import cached_env, host_devices_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.head_dim=16", "model.mlp_dim=64",
        "model.seq_len=128", "model.window=8", "batch_size=8", "final_eval_tokens=1024", "eval_batches=1",
        "steps=4", "checkpoint_every=2"]
SWEEP = ["--config", "tiny", "--variants", "dense", "fib-linear", "--seeds", "0", "1", "--budgets", "full",
         "window-only", "--set", *TINY]


def _module(*args, timeout=600, cwd=ROOT):
  """``python -m ARGS``, sharing compiled programs with the other runs, on 2 simulated devices
  (``tests.compile_cache``: the cells' probes compute their batches on every device)."""
  env = host_devices_env(cached_env({**os.environ, "PYTHONPATH": str(ROOT)}))
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                        env=env)


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
  here = tmp_path_factory.mktemp("sweep")
  root = here / "root"
  res = _module("train.study.sweep", "--root", "root", *SWEEP, cwd=here)  # a relative root, as users type it
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  assert "[sweep] done 4 / running 0 / left 0" in res.stdout
  rep = _module("train.study.report", str(root))
  assert rep.returncode == 0, rep.stderr[-3000:]
  return root


def test_sweep_runs_every_cell_through_every_stage(sweep_root):
  for v in ("dense", "fib-linear"):
    for s in (0, 1):
      cell = json.loads((sweep_root / f"{v}-s{s}" / "cell.json").read_text())
      assert cell["variant"] == v and cell["seed"] == s and cell["step"] == 4
      texts = {"eval"} | {f"ood:{name}" for name in ood_paths()}
      expected = texts | {f"{k}:sink" for k in texts} if v == "dense" else texts | {"budget"}
      assert set(cell["files"]) == expected | {"passkey"}
      budget = json.loads((sweep_root / f"{v}-s{s}" / "data_budget.json").read_text())
      assert budget["training_tokens"] == 4 * 8 * 128
  latency = json.loads((sweep_root / "latency.json").read_text())
  assert set(latency["variants"]) == {"dense", "fib-linear"}
  for name in ("ppl_by_length", "loss_by_position", "passkey", "budget", "latency"):
    assert (sweep_root / "plots" / f"{name}.png").stat().st_size > 1000


def test_report_numbers_are_the_run_files_numbers(sweep_root):
  text = (sweep_root / "report.md").read_text()
  for v in ("dense", "fib-linear"):
    evals = [json.loads((sweep_root / f"{v}-s{s}" / json.loads((sweep_root / f"{v}-s{s}" / "cell.json").read_text())
                         ["files"]["eval"]).read_text()) for s in (0, 1)]
    row = next(line for line in text.splitlines() if line.startswith(f"| {v} | 2 |"))
    for m in (1, 2, 4):
      ppls = [e[f"{m}x"]["ppl"] for e in evals]
      assert f"{stats.mean(ppls):.3f} +- {stats.std(ppls):.3f}" in row
    rises = [e["4x"]["ppl"] / e["1x"]["ppl"] - 1 for e in evals]
    assert f"{100 * stats.mean(rises):+.1f}%" in row
  lat = json.loads((sweep_root / "latency.json").read_text())["variants"]["fib-linear"]
  assert f"| fib-linear | {lat['forward_1x_ms']:.3f} | {lat['forward_4x_ms']:.3f} |" in text
  verdicts = re.findall(r"\*\*(agree|disagree|inconclusive)\*\* \|", text)
  assert len(verdicts) == 6


def test_second_sweep_skips_finished_cells_and_refuses_another_recipe(sweep_root):
  before = {p: p.stat().st_mtime_ns for p in sweep_root.rglob("*") if p.is_file() and "logs" not in p.parts}
  again = _module("train.study.sweep", "--root", str(sweep_root), *SWEEP, "--no-latency")
  assert again.returncode == 0 and "4 already done" in again.stdout
  other = _module("train.study.sweep", "--root", str(sweep_root), *SWEEP[:-len(TINY)], *TINY[:-1], "checkpoint_every=1")
  assert other.returncode == 2 and "another recipe" in other.stderr
  after = {p: p.stat().st_mtime_ns for p in sweep_root.rglob("*") if p.is_file() and "logs" not in p.parts}
  changed = {p for p in after if before.get(p) != after[p]} - {sweep_root / "sweep_cost.jsonl"}
  assert not changed


def test_evaluate_cli_names_each_evaluation_and_takes_any_text(sweep_root, tmp_path):
  run = sweep_root / "fib-linear-s0"
  text = tmp_path / "speech.txt"
  text.write_text("Fellow-Citizens of the Senate and of the House of Representatives. " * 60)
  res = _module("train.probe.evaluate", "--workdir", str(run), "--lengths", "1", "2", "--data", str(text),
                "--tokens", "256", timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  written = [p for p in (run / "evals").iterdir() if "speech" in p.name]
  assert len(written) == 1 and re.fullmatch(r"step4_speech-[0-9a-f]{8}_x1-2_t256\.json", written[0].name)
  record = json.loads(written[0].read_text())
  assert record["multiples"] == [1, 2] and record["targets"] == 256
  missing = _module("train.probe.evaluate", "--workdir", str(run), "--data", str(tmp_path / "nope.txt"), timeout=120)
  assert missing.returncode == 2 and "does not exist: give a .txt" in missing.stderr, missing.stderr
  assert len(missing.stderr.splitlines()) == 1
  no_run = _module("train.probe.evaluate", "--workdir", str(tmp_path / "no_run"), timeout=120)
  assert no_run.returncode == 2 and "does not exist" in no_run.stderr


def test_bad_sweep_inputs_are_refused_before_anything_is_written(tmp_path):
  res = _module("train.study.sweep", "--root", str(tmp_path / "r"), "--config", "tiny", "--variants", "fib-sparse",
                timeout=120)
  assert res.returncode == 2 and "variant" in res.stderr and not (tmp_path / "r").exists()
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("mine")
  res = _module("train.study.sweep", "--root", str(tmp_path / "busy"), "--config", "tiny", "--variants", "dense",
                timeout=120)
  assert res.returncode == 2 and "not empty" in res.stderr
  assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


def test_nested_windows_score_identical_targets_at_every_length():
  tokens = np.arange(5000, dtype=np.int32)
  windows = evaluation.nested_windows(tokens, 16, (1, 2, 4), 300)
  targets = {m: w[:, 1:].reshape(-1) for m, w in windows.items()}
  np.testing.assert_array_equal(targets[1], targets[2])
  np.testing.assert_array_equal(targets[1], targets[4])
  assert len(targets[1]) == 256  # 300 // 64 chunks of 64 targets
  for m, w in windows.items():  # each window is a contiguous run of the stream
    assert w.shape[1] == 16 * m + 1 and (np.diff(w, axis=1) == 1).all()
  with pytest.raises(ValueError, match="lengths"):
    evaluation.nested_windows(tokens, 16, (), 300)


def test_evaluation_files_are_never_overwritten(tmp_path):
  path = tmp_path / "e.json"
  evaluation.write_new(path, {"a": 1})
  with pytest.raises(ValueError, match="not overwritten"):
    evaluation.write_new(path, {"a": 2})
  assert json.loads(path.read_text()) == {"a": 1}


def test_a_file_in_place_of_the_results_folder_is_refused_before_computing(tmp_path):
  (tmp_path / "budget").write_text("mine\n")
  computed = []
  with pytest.raises(ValueError, match="is a file, not a folder: move it away"):
    evaluation.read_or_write(tmp_path / "budget" / "r.json", lambda: computed.append(1) or {"a": 1})
  assert computed == [] and (tmp_path / "budget").read_text() == "mine\n"


def test_every_variant_of_a_seed_trains_on_the_same_tokens_in_the_same_order():
  tokens = data.tokenize(data.load_documents()[:3], data.ByteTokenizer())
  firsts = []
  for variant in ("dense", "fib-learned", "pow2-linear"):
    cfg = apply_overrides(configs.get_config("small", variant), ["seed=1"]).validate()
    it = iter(data.train_dataset(tokens, cfg.model.seq_len, cfg.batch_size, cfg.seed))
    firsts.append(np.stack([next(it) for _ in range(3)]))
  assert all((f == firsts[0]).all() for f in firsts)


def test_passkey_sample_places_the_key_where_it_says():
  tok = data.ByteTokenizer()
  tokens, key_start, n = passkey.sample(tok, 300, 0.5, "73019")
  assert len(tokens) == 301 and n == 5
  assert tok.decode(tokens[key_start : key_start + 5]) == "73019"
  assert tok.decode(tokens[-5:]) == "73019" and tok.decode(tokens[-n - 5 : -n]) == "y is "
  with pytest.raises(ValueError, match="too short"):
    passkey.sample(tok, 40, 0.5, "73019")


def test_reachable_distances_are_sums_of_one_hop_per_layer():
  hops = [np.array([0, 1, 5]), np.array([0, 1, 8])]
  ok = reach.reachable(hops, 20)
  expected = {a + b for a in (0, 1, 5) for b in (0, 1, 8)}
  assert {d for d in range(21) if ok[d]} == expected
  assert reach.reachable([np.array([0, 1]), None], 50).all()


def test_a_coprime_and_a_linear_order_reach_the_same_distances():
  """The layers' alphas in another order (``fib-coprime`` against ``fib-linear``, 8 layers) change which
  layer holds which offsets, not the distances reached through all layers (sums do not depend on order)."""
  import configs  # noqa: PLC0415
  from fibjax.model import layer_patterns  # noqa: PLC0415

  hops = {v: [reach.pattern_hops(p) for p in layer_patterns(configs.get_config("starved", v).model)]
          for v in ("fib-coprime", "fib-linear")}
  assert [h.tolist() for h in hops["fib-coprime"]] != [h.tolist() for h in hops["fib-linear"]]  # another order
  assert sorted(map(tuple, hops["fib-coprime"])) == sorted(map(tuple, hops["fib-linear"]))  # of the same layers
  longest = 4 * configs.get_config("starved").model.seq_len
  assert np.array_equal(reach.reachable(hops["fib-coprime"], longest), reach.reachable(hops["fib-linear"], longest))
  assert not reach.reachable(hops["fib-linear"][:1], longest).all()  # one layer leaves holes: the test can fail


def test_verdict_rule():
  runs = {v: {s: {"eval": {"1x": {"loss": loss + 0.001 * s, "ppl": math.exp(loss)}}} for s in range(3)}
          for v, loss in (("fib-linear", 3.0), ("fib-fixed", 3.1))}
  assert report.lower_is(report.paired(runs, "fib-linear", "fib-fixed")) == "agree"
  assert report.lower_is(report.paired(runs, "fib-fixed", "fib-linear")) == "disagree"
  noisy = {v: {s: {"eval": {"1x": {"loss": 3.0 + (0.1 if (s + (v == "b")) % 2 else 0)}}} for s in range(3)}
           for v in ("a", "b")}
  assert report.lower_is(report.paired(noisy, "a", "b")) == "inconclusive"


def test_sweep_list_prints_one_command_per_unfinished_cell(sweep_root, tmp_path):
  """``--list`` runs and writes nothing: a scheduler gets one ``python -m train.experiment`` command per
  unfinished cell (none for a finished sweep); the root's recipe is checked as a sweep checks it."""
  done = _module("train.study.sweep", "--root", str(sweep_root), *SWEEP, "--list", timeout=300)
  assert done.returncode == 0 and done.stdout.strip() == "", done.stderr
  assert f"nothing left: every cell under {sweep_root} is finished" in done.stderr, done.stderr
  reruns = _module("train.study.sweep", "--root", str(sweep_root), *SWEEP, "--list", "--reruns", "1", timeout=300)
  assert [line.split(" --workdir ")[1].split()[0] for line in reruns.stdout.strip().splitlines()] == [
      f"{sweep_root.absolute()}/{v}-s0-rerun1" for v in ("dense", "fib-linear")], reruns.stderr
  fresh = tmp_path / "fresh"
  listed = _module("train.study.sweep", "--root", str(fresh), *SWEEP, "--list", timeout=300)
  lines = listed.stdout.strip().splitlines()
  assert listed.returncode == 0 and len(lines) == 4, listed.stderr
  for line, (v, s) in zip(lines, [(v, s) for s in (0, 1) for v in ("dense", "fib-linear")]):
    assert line.startswith("python -m train.experiment --workdir ")
    assert f"{fresh.absolute()}/{v}-s{s} " in line and f"--variant {v} --seed {s} " in line
  assert not fresh.exists()  # nothing ran, nothing was written: a preview locks no recipe
  other = _module("train.study.sweep", "--root", str(sweep_root), "--config", "small", "--list", timeout=300)
  assert other.returncode == 2 and "another recipe" in other.stderr
  assert f"another recipe (--config tiny --set {TINY[0]} " in other.stderr, other.stderr  # the flags that continue it
  assert other.stderr.endswith("or a new --root for --config small\n"), other.stderr


def test_decode_latency_is_timed_at_one_context_whatever_the_repeats(sweep_root, monkeypatch):
  """Every timed decode call starts right after the T-token prompt, from a cache of T + decode_tokens
  positions, for any ``--repeats``: a dense model's decode time grows with its context, so the context is fixed."""
  import jax  # noqa: PLC0415

  from train.run.mesh import make_mesh  # noqa: PLC0415
  from train.study import latency  # noqa: PLC0415

  calls = []
  real = latency.compiled_steps

  def spying(*args, **kwargs):
    prefill, steps = real(*args, **kwargs)

    def spy(state, token, pos, cache, key, n):
      calls.append((int(pos), jax.tree.leaves(cache)[0].shape[1], n))
      return steps(state, token, pos, cache, key, n)

    return prefill, spy

  monkeypatch.setattr(latency, "compiled_steps", spying)
  mesh = make_mesh(devices=jax.devices()[:1])
  run = latency.initialised_run(sweep_root / "dense-s0", mesh)
  with jax.set_mesh(mesh):
    latency.measure(run, 3, decode_tokens=2)
  assert calls == [(128, 130, 2)] * 4, calls  # the warm-up and three timed calls: one context, one cache size


def test_the_report_reads_the_latency_file_written_last_by_its_number(tmp_path):
  from train.study import sweeproot  # noqa: PLC0415

  for name in ("latency-10.json", "latency-2.json", "latency.json"):  # written in this order, numbered otherwise
    (tmp_path / name).write_text(json.dumps({"name": name}))
  assert [p.name for p in sweeproot.latency_files(tmp_path)] == ["latency.json", "latency-2.json", "latency-10.json"]
  assert report.latest_latency(tmp_path) == {"name": "latency-10.json", "file": "latency-10.json"}


def test_the_latency_section_flags_decode_times_measured_before_one_context():
  row = {"forward_1x_ms": 1.0, "forward_4x_ms": 2.0, "decode_ms_per_token": 0.1}
  old = {"repeats": 20, "device": "cpu", "jax": "0", "variants": {"dense": row}}
  assert "measure again for the dense row" in "\n".join(report.latency_section(old))
  assert "measure again" not in "\n".join(report.latency_section({**old, "decode_context": "T"}))
