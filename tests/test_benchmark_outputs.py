"""Benchmark commands never overwrite a results file unless ``--force``: ``benchmarks.cli.claim``
refuses in one line (exit 2) before any measurement. CPU only: the refusals come before any work."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from benchmarks import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "attention_NVIDIA_H200_33f78e0.json"


def _cli(module: str, *argv: str) -> subprocess.CompletedProcess:
  """The benchmark on the CPU backend (so the device, and with it the file names, is "cpu" on a GPU
  machine too)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *argv], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=env)


def _refused(res: subprocess.CompletedProcess, path: pathlib.Path) -> bool:
  err = res.stderr.strip().splitlines()
  return res.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0] \
      and "--force" in err[0]


def test_claim_refuses_an_existing_file_unless_forced(tmp_path, capsys):
  taken, free = tmp_path / "taken.json", tmp_path / "free.json"
  taken.write_text("{}")
  cli.claim([free], force=False)
  cli.claim([free, taken], force=True)
  assert capsys.readouterr().err == ""
  with pytest.raises(SystemExit) as e:
    cli.claim([free, taken], force=False)
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
  assert str(taken) in err[0] and "--force" in err[0] and str(free) not in err[0]
  assert taken.read_text() == "{}"


def test_attention_rewrite_refuses_to_overwrite_its_output_unless_forced(tmp_path):
  run = tmp_path / "run.json"
  shutil.copy(COMMITTED, run)
  out = tmp_path / "out"
  res = _cli("attention", "--rewrite", str(run), "--out", str(out))
  assert res.returncode == 0, res.stderr
  written = {p: p.read_bytes() for p in (out / "attention_NVIDIA_H200.json", out / "attention_NVIDIA_H200.md")}
  res = _cli("attention", "--rewrite", str(run), "--out", str(out))
  assert _refused(res, out / "attention_NVIDIA_H200.json"), res.stderr
  assert all(p.read_bytes() == b for p, b in written.items())
  res = _cli("attention", "--rewrite", str(run), "--out", str(out), "--force")
  assert res.returncode == 0, res.stderr
  assert sorted(p.name for p in out.iterdir()) == ["attention_NVIDIA_H200.json", "attention_NVIDIA_H200.md"]


# (command line, files it writes into --out on a CPU-only machine, the device being "cpu")
REFUSED = [
    (["attention", "--no-flex"], ["attention_cpu.json", "attention_cpu.md"]),
    (["attention"], ["attention_cpu.md"]),  # the device named by a process of its own, before FlexAttention
    (["decode"], ["decode_cpu.md"]),
    (["norm"], ["norm_cpu.json"]),
    (["train_throughput"], ["train_throughput_cpu.json"]),
    (["tune_attention", "--kv-heads", "2", "--learned"], ["tune_attention_cpu_n1024_b32_kv2_d64_learned.json"]),
    (["tune_decode"], ["tune_decode_cpu.json"]),
    (["dp_scaling", "--set", "batch_size=64", "--control"], ["dp_scaling_2gpu_small_batch_size-64_control.md"]),
]


@pytest.mark.parametrize("argv, files", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_benchmarks_refuse_existing_results_before_measuring(tmp_path, argv, files):
  out = tmp_path / "out"
  out.mkdir()
  for name in files:
    (out / name).write_text("kept")
  res = _cli(*argv, "--out", str(out))
  assert _refused(res, out / files[0]), res.stderr
  assert res.stdout == "" and all((out / name).read_text() == "kept" for name in files)
  assert sorted(p.name for p in out.iterdir()) == sorted(files)


def test_kernel_registers_refuses_its_summary_before_lowering(tmp_path):
  (tmp_path / "triton" / "triton").mkdir(parents=True)
  out = tmp_path / "out"
  out.mkdir()
  (out / "kernel_registers_loop_group.json").write_text("kept")
  res = _cli("kernel_registers", "--triton", str(tmp_path / "triton"), "--loop-group", "--out", str(out))
  assert _refused(res, out / "kernel_registers_loop_group.json"), res.stderr
  assert (out / "kernel_registers_loop_group.json").read_text() == "kept"
  res = _cli("kernel_registers", "--triton", str(tmp_path / "triton"), "--defaults", "--loop-group", "--out", str(out))
  assert res.returncode == 2 and "--defaults takes every option at its default" in res.stderr, res.stderr


def test_prepare_scale_refuses_existing_results_and_leaves_dir_alone(tmp_path):
  out, work = tmp_path / "out", tmp_path / "work"
  out.mkdir()
  work.mkdir()
  (out / "prepare_scale.json").write_text("kept")
  (work / "kept.txt").write_text("kept")
  res = _cli("prepare_scale", "--dir", str(work), "--gb", "0.001", "--out", str(out))
  assert _refused(res, out / "prepare_scale.json"), res.stderr
  assert (out / "prepare_scale.json").read_text() == "kept" and (work / "kept.txt").read_text() == "kept"


def test_prepare_scale_refuses_a_dir_it_did_not_make(tmp_path):
  """It deletes its --dir at the start and end: a folder of other files is refused, untouched."""
  work = tmp_path / "work"
  work.mkdir()
  (work / "kept.txt").write_text("kept")
  res = _cli("prepare_scale", "--dir", str(work), "--gb", "0.001", "--out", str(tmp_path / "out"))
  err = res.stderr.strip().splitlines()
  assert res.returncode == 2 and len(err) == 1 and "holds files this benchmark did not make" in err[0], res.stderr
  assert (work / "kept.txt").read_text() == "kept" and not (tmp_path / "out").exists()
