"""Benchmark tools that run without a GPU: ``benchmarks.ab`` (base and head alternate, their JSON
times matched by identity) and ``benchmarks.kernel_registers`` (the kernels' Triton modules)."""

import json
import subprocess
import sys

from benchmarks import ab, kernel_registers

_WRITE = ("import json, os, pathlib, sys; out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1]); "
          "out.mkdir(parents=True); rows = [{'variant': 'x', 'n': 8, 'step_ms': 2.0 if os.path.isfile('HEAD_MARK') "
          "else 1.0, 'loss': 3.0}]; (out / 'bench.json').write_text(json.dumps({'rows': rows[::-1]}))")


def test_leaves_name_rows_by_identity_and_keep_only_times():
  tree = {"rows": [{"variant": "dense", "n": 4, "step_ms": 1.5, "tokens_per_s": 9.0, "loss": 2.0, "remat": False}],
          "copy_ms": 0.25, "params": 7}
  assert ab.leaves(tree) == {"rows/variant=dense,n=4/step_ms": 1.5, "rows/variant=dense,n=4/tokens_per_s": 9.0,
                             "copy_ms": 0.25}


def test_ab_runs_both_trees_alternately_and_reports_head_over_base(tmp_path, monkeypatch):
  base = tmp_path / "base"
  (base / "fibjax").mkdir(parents=True)
  monkeypatch.setattr(ab, "HEAD", tmp_path / "head")
  (tmp_path / "head").mkdir()
  (tmp_path / "head" / "HEAD_MARK").write_text("")
  out = tmp_path / "ab"
  monkeypatch.setattr(sys, "argv", ["ab", str(base), "--rounds", "2", "--out", str(out), "--", "-c", _WRITE])
  ab.main()
  (row,) = json.loads((out / "ab.json").read_text())["rows"]
  assert row["measurement"] == "bench:rows/variant=x,n=8/step_ms"
  assert (row["base"], row["head"], row["head_over_base"]) == (1.0, 2.0, 2.0)
  assert sorted(p.name for p in out.iterdir()) == ["ab.json", "base_r0", "base_r1", "head_r0", "head_r1"]


def test_ab_refuses_a_base_that_is_not_a_checkout(tmp_path):
  res = subprocess.run([sys.executable, "-m", "benchmarks.ab", str(tmp_path), "--kernel"], capture_output=True,
                       text=True)
  assert res.returncode == 2 and res.stderr.strip().startswith("error: BASE_TREE must be a checkout")


def test_kernel_registers_captures_the_three_triton_modules():
  modules = kernel_registers.triton_modules(64, 2, learned=False, term_mma=True, loop_group=True)
  assert [m.split("{")[0].strip() for m in modules] == [
      "module @fib_attention_fwd", "module @fib_attention_dq", "module @fib_attention_dkdv"]
  assert all("tt.func" in m for m in modules) and "scf.for" in modules[2]  # the group loop


def test_kernel_registers_reads_ptxas_and_refuses_a_missing_triton(tmp_path):
  report = ("ptxas info : Function properties for k 40 bytes stack frame, 68 bytes spill stores, 192 bytes spill "
            "loads ptxas info : Used 255 registers, used 1 barriers")
  assert kernel_registers.parse(report) == {"registers": 255, "stack_bytes": 40, "spill_store_bytes": 68,
                                            "spill_load_bytes": 192}
  res = subprocess.run([sys.executable, "-m", "benchmarks.kernel_registers", "--triton", str(tmp_path)],
                       capture_output=True, text=True)
  assert res.returncode == 2 and res.stderr.startswith("error: no triton package in")
