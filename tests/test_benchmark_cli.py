"""Benchmark command lines refuse what they cannot do in one ``error:`` line (exit code 2) before any
work: a GPU benchmark on JAX's CPU backend, an ``--out`` that is a file, a count below its minimum,
an unknown recipe or variant; ``benchmarks.flex_peer`` answers ``--help`` without torch. Each
``main`` runs in this process, on the CPU backend (``JAX_PLATFORMS=cpu`` for the process that names
the device), with ``--out`` under ``tmp_path``; nothing is measured."""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import sys
from typing import Callable

import pytest

from benchmarks import (ab, attention, cli, decode, determinism, dp_scaling, floor, kernel_registers, mosaic_check,
                        norm, prepare_scale, train_throughput, tune_attention, tune_decode)

NEEDS_GPU = "and needs a GPU (JAX's backend here is cpu): run it on a GPU machine"


@pytest.fixture(scope="module", autouse=True)
def cpu_backend():
  """The device process sees JAX's CPU backend (on a GPU machine too); it runs once for the module."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAX_PLATFORMS", "cpu")
    cli.device.cache_clear()
    yield
  cli.device.cache_clear()


def _refusal(capsys, main: Callable[[list[str]], object], argv: list[str], printed: int = 0) -> str:
  """The one ``error:`` line ``main(argv)`` exits with (code 2), after ``printed`` lines on stdout."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    main(argv)
  out, err = capsys.readouterr()
  lines = err.strip().splitlines()
  assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (e.value.code, err)
  assert len(out.splitlines()) == printed, out
  return lines[0]


def _files(folder: pathlib.Path) -> list[pathlib.Path]:
  return [p for p in folder.rglob("*") if p.is_file()]


GPU_ONLY = [  # (module, arguments besides --out, what the refusal says it does)
    (attention, ["--n", "1024", "--shapes", "mha_d64", "--no-flex", "--reps", "1"], "times GPU kernels"),
    (floor, ["--no-flex"], "times GPU kernels"),
    (norm, ["--rows", "64"], "times GPU kernels"),
    (decode, [], "times decoding on GPU kernels"),
    (tune_attention, ["--n", "256", "--batch", "1"], "times GPU kernels"),
    (tune_decode, ["--batches", "1"], "times GPU kernels"),
    (train_throughput, ["--variants", "fib-linear"], "times training steps on the GPU"),
    (dp_scaling, ["--config", "tiny", "--steps", "20"], "compares training on one GPU and on several"),
]


@pytest.mark.parametrize("module, argv, does", GPU_ONLY, ids=[m.__name__.split(".")[1] for m, _, _ in GPU_ONLY])
def test_gpu_benchmarks_refuse_a_cpu_backend_and_write_nothing(capsys, tmp_path, module, argv, does):
  line = _refusal(capsys, module.main, [*argv, "--out", str(tmp_path / "out")])
  assert line == f"error: {module.__name__} {does} {NEEDS_GPU}"
  assert _files(tmp_path) == []


def test_gpu_tools_without_out_refuse_a_cpu_backend(capsys, tmp_path):
  """mosaic_check prints its header (device, jax, offsets) before its first case refuses."""
  for argv, printed in ((["--n", "1024"], 1), (["--n", "1024", "--sweep"], 0)):
    assert _refusal(capsys, mosaic_check.main, argv, printed) == \
        f"error: benchmarks.mosaic_check runs Mosaic GPU kernels {NEEDS_GPU}"
  root = tmp_path / "root"
  assert _refusal(capsys, determinism.main, ["--root", str(root), "--steps", "2"]) == \
      f"error: benchmarks.determinism compares XLA's GPU algorithms {NEEDS_GPU}"
  assert not root.exists()
  base = tmp_path / "base"
  (base / "fibjax").mkdir(parents=True)
  out = tmp_path / "ab"
  assert _refusal(capsys, ab.main, [str(base), "--kernel", "--n", "256", "--rounds", "1", "--out", str(out)]) == \
      f"error: benchmarks.ab --kernel times GPU kernels {NEEDS_GPU}"
  assert _files(tmp_path) == []


def test_ab_says_no_round_finished_when_the_first_run_fails(capsys, tmp_path, monkeypatch):
  base = tmp_path / "base"
  (base / "fibjax").mkdir(parents=True)
  monkeypatch.setattr(ab, "HEAD", tmp_path / "head")
  (tmp_path / "head").mkdir()
  out = tmp_path / "ab"
  with pytest.raises(SystemExit) as e:
    ab.main([str(base), "--rounds", "1", "--out", str(out), "--", "-c", "print(1)"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 1 and err[-1] == (f"error: base round 0 wrote no JSON under {out / 'base_r0'}; no round "
                                           f"finished, so {out / 'ab.json'} was not written; fix the command and "
                                           f"run it again")
  assert not (out / "ab.json").exists()


OUT_IS_A_FILE = [  # (module, arguments besides --out)
    (decode, []),
    (norm, []),
    (tune_attention, []),
    (tune_decode, []),
    (train_throughput, []),
    (dp_scaling, ["--config", "tiny"]),
    (attention, ["--no-flex"]),
    (prepare_scale, ["--gb", "0.01"]),
    (kernel_registers, []),
]


@pytest.mark.parametrize("module, argv", OUT_IS_A_FILE, ids=[m.__name__.split(".")[1] for m, _ in OUT_IS_A_FILE])
def test_an_out_that_is_a_file_is_refused_before_any_work(capsys, tmp_path, module, argv):
  out = tmp_path / "out"
  out.write_text("keep me\n")
  if module is prepare_scale:
    argv = [*argv, "--dir", str(tmp_path / "work")]
  if module is kernel_registers:
    (tmp_path / "triton" / "triton").mkdir(parents=True)
    argv = [*argv, "--triton", str(tmp_path / "triton")]
  assert _refusal(capsys, module.main, [*argv, "--out", str(out)]) == f"error: --out {out} is a file; give a folder"
  assert out.read_text() == "keep me\n" and not (tmp_path / "work").exists()


def test_an_out_that_cannot_be_made_is_refused(capsys, tmp_path):
  (tmp_path / "file").write_text("")
  out = tmp_path / "file" / "out"
  assert _refusal(capsys, norm.main, ["--out", str(out)]) == \
      f"error: --out {out} cannot be made (Not a directory); give a folder you can write to"


COUNTS = [  # (module, arguments, the refusal)
    (attention, ["--n", "0"], "--n takes sequence lengths of at least 1, got 0"),
    (attention, ["--n", "1024", "-5"], "--n takes sequence lengths of at least 1, got -5"),
    (attention, ["--reps", "0"], "--reps takes at least 1, got 0"),
    (tune_attention, ["--n", "0"], "--n takes a sequence length of at least 1, got 0"),
    (tune_attention, ["--kv-heads", "0"], "--kv-heads takes at least 1, got 0"),
    (decode, ["--batches", "0"], "--batches takes batch sizes of at least 1, got 0"),
    (decode, ["--contexts", "0"], "--contexts takes context lengths of at least 1, got 0"),
    (norm, ["--rows", "0"], "--rows takes at least 1, got 0"),
    (tune_decode, ["--batches", "-1"], "--batches takes batch sizes of at least 1, got -1"),
    (mosaic_check, ["--n", "0"], "--n takes sequence lengths of at least 1, got 0"),
    (train_throughput, ["--steps", "1"], "--steps takes at least 2 (the first timed step is left out), got 1"),
    (dp_scaling, ["--steps", "2"],
     "--steps takes at least 20 (two logging intervals of 10 steps; the first one's throughput includes "
     "compiling), got 2"),
    (determinism, ["--repeats", "0"], "--repeats takes at least 2 (each mode's reruns are compared), got 0"),
    (prepare_scale, ["--gb", "0"], "--gb takes at least 0.001, got 0.0"),
    (ab, ["--kernel", "--n", "0"], "--n takes sequence lengths of at least 1, got 0"),
]


@pytest.mark.parametrize("module, argv, message", COUNTS, ids=[" ".join([m.__name__.split(".")[1], *a])
                                                                for m, a, _ in COUNTS])
def test_counts_below_their_minimum_are_refused_naming_the_flag(capsys, tmp_path, module, argv, message):
  if module is determinism:
    argv = [*argv, "--root", str(tmp_path / "root")]
  if module is ab:
    (tmp_path / "base" / "fibjax").mkdir(parents=True)
    argv = [str(tmp_path / "base"), *argv]
  out = [] if module in (mosaic_check, determinism) else ["--out", str(tmp_path / "out")]
  assert _refusal(capsys, module.main, [*argv, *out]) == f"error: {message}"
  assert not (tmp_path / "out").exists() and not (tmp_path / "root").exists()


def test_a_count_that_is_not_a_number_is_one_line(capsys, tmp_path):
  assert _refusal(capsys, decode.main, ["--batches", "x", "--out", str(tmp_path / "out")]) == \
      "error: argument --batches: invalid int value: 'x' (--help lists the arguments)"


@pytest.mark.parametrize("module, argv, flag", [
    (train_throughput, ["--variants", "dense", "bogus"], "--variants"),
    (determinism, ["--variant", "bogus"], "--variant"),
    (determinism, ["--config", "bogus"], "--config"),
    (dp_scaling, ["--config", "bogus"], "--config"),
], ids=["train_throughput --variants", "determinism --variant", "determinism --config", "dp_scaling --config"])
def test_unknown_variants_and_recipes_are_refused(capsys, tmp_path, module, argv, flag):
  root = ["--root", str(tmp_path / "root")] if module is determinism else ["--out", str(tmp_path / "out")]
  line = _refusal(capsys, module.main, [*argv, *root])
  assert line.startswith(f"error: argument {flag}: invalid choice: 'bogus' (choose from ")
  assert ("'tiny'" if flag == "--config" else "'fib-linear'") in line
  assert _files(tmp_path) == [] and not (tmp_path / "root").exists()


def test_train_throughput_without_dense_writes_its_table(tmp_path, monkeypatch, capsys):
  """Speed vs dense is "n/a" where dense was not run; both files are written."""
  row = {"variant": "fib-linear", "kernels": "default", "seq_len": 64, "batch": 2, "step_ms": 10.0,
         "synced_step_ms": 11.0, "tokens_per_s": 12800.0, "mfu": None, "params": 1, "loss": 5.0, "remat": False}
  monkeypatch.setattr(train_throughput, "device_kind", lambda: "Fake GPU")
  monkeypatch.setattr(train_throughput, "require_gpu", lambda what: None)
  monkeypatch.setattr(train_throughput.xla_flags, "apply_defaults", lambda: None)
  monkeypatch.setattr(train_throughput, "measure", lambda variant, seq_len, tokens, steps, kernels: dict(row))
  train_throughput.main(["--variants", "fib-linear", "--seq-lens", "64", "--out", str(tmp_path)])
  assert json.loads((tmp_path / "train_throughput_Fake_GPU.json").read_text())["rows"] == [row]
  md = (tmp_path / "train_throughput_Fake_GPU.md").read_text()
  assert "| 64 | fib-linear | default | 2 | 10.0 | 11.0 | 12,800 | n/a | n/a (dense not run) |" in md
  capsys.readouterr()


def test_train_throughput_runs_each_sparse_variant_on_each_kernel_family(tmp_path, monkeypatch, capsys):
  """``--kernels triton mosaic``: dense once, each sparse variant once per family, in that order,
  each asked of the model by ``ModelConfig.attention_kernels`` (the Pallas attention)."""
  runs = []

  def measure(variant, seq_len, tokens, steps, kernels):
    runs.append((variant, kernels))
    cfg = train_throughput.configs.get_config("paper", variant)
    model = dataclasses.replace(cfg.model, attention_impl="pallas", attention_kernels=kernels) if kernels else cfg.model
    model.validate()
    return {"variant": variant, "kernels": kernels or "default", "seq_len": seq_len, "batch": 1, "step_ms": 1.0,
            "synced_step_ms": 1.0, "tokens_per_s": 100.0 * (1 + len(runs)), "mfu": None}

  monkeypatch.setattr(train_throughput, "device_kind", lambda: "Fake GPU")
  monkeypatch.setattr(train_throughput, "require_gpu", lambda what: None)
  monkeypatch.setattr(train_throughput.xla_flags, "apply_defaults", lambda: None)
  monkeypatch.setattr(train_throughput, "measure", measure)
  train_throughput.main(["--variants", "dense", "fib-linear", "--seq-lens", "64", "--kernels", "triton", "mosaic",
                         "--out", str(tmp_path)])
  assert runs == [("dense", None), ("fib-linear", "triton"), ("fib-linear", "mosaic")]
  md = (tmp_path / "train_throughput_Fake_GPU.md").read_text()
  assert "| 64 | fib-linear | triton | 1 | 1.0 | 1.0 | 300 | n/a | 1.50x |" in md
  assert "| 64 | fib-linear | mosaic | 1 | 1.0 | 1.0 | 400 | n/a | 2.00x |" in md
  capsys.readouterr()


def test_flex_peer_answers_help_and_refuses_a_run_without_torch(capsys, monkeypatch):
  """Imported with torch made unimportable (as where it is not installed)."""
  monkeypatch.setitem(sys.modules, "torch", None)
  monkeypatch.delitem(sys.modules, "benchmarks.flex_peer", raising=False)
  flex_peer = importlib.import_module("benchmarks.flex_peer")
  with pytest.raises(SystemExit) as e:
    flex_peer.main(["--help"])
  assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m benchmarks.flex_peer")
  line = _refusal(capsys, flex_peer.main, ["--n", "64", "--window", "8", "--offsets", "13,21"])
  assert line.startswith("error: benchmarks.flex_peer times torch's FlexAttention and needs torch") \
      and line.endswith(": pip install torch")
  assert _refusal(capsys, flex_peer.main, ["--n", "0", "--window", "8", "--offsets", "13"]) == \
      "error: --n takes sequence lengths of at least 1, got 0"
