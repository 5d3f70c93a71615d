"""Benchmark tools that run without a GPU: ``benchmarks.ab`` (base and head alternate, their JSON
times matched by identity), ``benchmarks.kernel_registers`` (the kernels' Triton modules) and the
merge of ``benchmarks.attention`` runs, ``benchmarks.task_data`` (the synthetic tasks' host time)."""

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import ab, attention, kernel_registers

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
  assert sorted(p.name for p in out.iterdir()) == ["ab.json", "base_r0", "base_r1", "head_r0", "head_r1", "plan.json"]


def test_ab_resume_keeps_finished_runs_and_refuses_other_commands(tmp_path, monkeypatch, capsys):
  """A run cut off after its first round continues with --resume: finished runs are kept, not
  repeated; a run cut off midway is kept aside and run again; another command, other code, or
  fewer rounds than are finished are refused in one line; a failing or silent command stops with
  ab.json holding the rounds before it."""
  base = tmp_path / "base"
  (base / "fibjax").mkdir(parents=True)
  monkeypatch.setattr(ab, "HEAD", tmp_path / "head")
  (tmp_path / "head").mkdir()
  out = tmp_path / "ab"

  def run(*argv, command=_WRITE):
    monkeypatch.setattr(sys, "argv", ["ab", str(base), "--out", str(out), *argv, "--", "-c", command])
    ab.main()

  def refused(*argv, command=_WRITE, code=2):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
      run(*argv, command=command)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == code and err[-1].startswith("error: ")
    return err[-1]

  run("--rounds", "1")
  first = (out / "base_r0" / "bench.json").stat().st_mtime_ns
  assert json.loads((out / "ab.json").read_text())["rounds"] == 1
  assert "--resume to continue" in refused("--rounds", "2") and not (out / "base_r1").exists()
  run("--rounds", "2", "--resume")
  assert (out / "base_r0" / "bench.json").stat().st_mtime_ns == first
  assert json.loads((out / "ab.json").read_text())["rounds"] == 2 and (out / "head_r1" / ".done").is_file()
  assert "another command" in refused("--rounds", "3", "--resume", command=_WRITE + "  # another command")
  assert "give --rounds 2 or more" in refused("--rounds", "1", "--resume")
  (out / "head_r1" / ".done").unlink()  # as if cut off mid-run: kept aside, run again
  run("--rounds", "2", "--resume")
  assert (out / "head_r1.partial" / "bench.json").is_file() and (out / "head_r1" / ".done").is_file()
  (tmp_path / "head" / "fibjax").mkdir()
  (tmp_path / "head" / "fibjax" / "new.py").write_text("x = 1\n")  # the head's code changed
  assert "another command, base or code" in refused("--rounds", "3", "--resume")


def test_ab_stops_in_one_line_on_a_failing_or_silent_command(tmp_path, monkeypatch, capsys):
  base = tmp_path / "base"
  (base / "fibjax").mkdir(parents=True)
  monkeypatch.setattr(ab, "HEAD", tmp_path / "head")
  (tmp_path / "head").mkdir()
  for command, message in (("print(1)", "wrote no JSON"), ("raise SystemExit(3)", "exited with 3")):
    out = tmp_path / message.replace(" ", "_")
    monkeypatch.setattr(sys, "argv", ["ab", str(base), "--out", str(out), "--", "-c", command])
    with pytest.raises(SystemExit) as e:
      ab.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err[-1].startswith("error: base round 0 ") and message in err[-1]
    assert not (out / "ab.json").exists()


def test_ab_refuses_bad_input_before_running_anything(tmp_path):
  def ab_cli(*argv):
    return subprocess.run([sys.executable, "-m", "benchmarks.ab", *argv], capture_output=True, text=True)

  res = ab_cli(str(tmp_path), "--kernel")
  assert res.returncode == 2 and res.stderr.strip().startswith("error: BASE_TREE must be a checkout")
  (tmp_path / "fibjax").mkdir()
  res = ab_cli(str(tmp_path), "--kernel", "--rounds", "0")
  assert res.returncode == 2 and "--rounds must be at least 1" in res.stderr
  (tmp_path / "out" / "base_r0").mkdir(parents=True)
  (tmp_path / "out" / "base_r0" / "old.json").write_text("{}")
  res = ab_cli(str(tmp_path), "--kernel", "--out", str(tmp_path / "out"))
  assert res.returncode == 2 and "already holds runs" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_kernel_registers_captures_the_three_triton_modules():
  configs = kernel_registers.form_configs(64, 2, learned=False, term_mma=True, loop_group=True)
  modules = kernel_registers.triton_modules(64, 2, False, *configs)
  assert [m.split("{")[0].strip() for m in modules] == [
      "module @fib_attention_fwd", "module @fib_attention_dq", "module @fib_attention_dkdv"]
  assert all("tt.func" in m for m in modules) and "scf.for" in modules[2]  # the group loop


def test_kernel_registers_defaults_lower_the_default_kernels_on_their_warps():
  """In the default configuration, the learned d64 forward loops over its terms and its dK/dV
  reads the saved term probabilities (no neighbour tiles: fewer loads than the recomputing form);
  the lowering gives the learned d128 backward 8 warps and the rest 4."""
  (fwd, _), _, (dkdv, _) = kernel_registers.lowered_kernels(64, 8, learned=True)
  config, config_bwd = kernel_registers.default_configs(64, 8, learned=True)
  _, _, (recomputing, _) = kernel_registers.lowered_kernels(64, 8, True, config,
                                                           dataclasses.replace(config_bwd, saved_terms=False))
  assert "scf.for" in fwd and dkdv.count("tt.load") < recomputing.count("tt.load")
  warps = lambda *shape: [w for _, w in kernel_registers.lowered_kernels(*shape)]  # noqa: E731
  assert warps(128, 8, True) == [4, 8, 8] and warps(128, 2, False) == [4, 4, 4]


def test_kernel_registers_reads_ptxas_and_refuses_a_missing_triton(tmp_path):
  report = ("ptxas info : Function properties for k 40 bytes stack frame, 68 bytes spill stores, 192 bytes spill "
            "loads ptxas info : Used 255 registers, used 1 barriers")
  assert kernel_registers.parse(report) == {"registers": 255, "stack_bytes": 40, "spill_store_bytes": 68,
                                            "spill_load_bytes": 192}
  res = subprocess.run([sys.executable, "-m", "benchmarks.kernel_registers", "--triton", str(tmp_path)],
                       capture_output=True, text=True)
  assert res.returncode == 2 and res.stderr.startswith("error: no triton package in")


def _attention_run(shape: str, n: str, ms: float, block: int = 64) -> dict:
  return {"device": "GPU", "jax": "0.11.2", "copy_bandwidth_Bps": 3e12, "command": f"run {shape}",
          "config": {"W": 64, "block": block, "shapes": {shape: [8, 2, 64]}},
          "runs": {shape: {n: {"fwd_ms": {"fib static": ms}}}},
          "flex": {"sizes": {shape: {n: {"fwd_ms": 4 * ms}}}}}


def test_attention_merge_keeps_each_run_and_refuses_overlaps_or_other_configs():
  merged = attention.merge([_attention_run("mha_d64", "16384", 1.0), _attention_run("mha_d64", "65536", 2.0),
                            _attention_run("gqa_d64", "16384", 3.0)])
  assert {s: sorted(r) for s, r in merged["runs"].items()} == {"mha_d64": ["16384", "65536"], "gqa_d64": ["16384"]}
  assert merged["flex"]["sizes"]["mha_d64"]["65536"]["fwd_ms"] == 8.0
  for other in (_attention_run("mha_d64", "16384", 5.0), _attention_run("gqa_d64", "65536", 5.0, block=32)):
    with pytest.raises(SystemExit) as e:
      attention.merge([_attention_run("mha_d64", "16384", 1.0), other])
    assert e.value.code == 2


def test_attention_summary_rows_carry_each_runs_times_in_length_order():
  def run(shape, heads, n, ms):
    times = {"fib static": ms, "fib learned": 2 * ms, "cuDNN window only": ms / 2}
    sizes = {n: {"fwd_ms": times, "fwd_bwd_ms": {k: 3 * v for k, v in times.items()}}}
    return {"device": "GPU", "jax": "0.11.2", "copy_bandwidth_Bps": 3e12, "command": "run",
            "config": {"shapes": {shape: heads}}, "runs": {shape: sizes},
            "flex": {"sizes": {shape: {n: {"fwd_ms": 4 * ms, "fwd_bwd_ms": 6 * ms}}}}}

  merged = attention.merge([run("mha_d64", [8, 8, 64], "65536", 2.0), run("mha_d64", [8, 8, 64], "4096", 1.0),
                            run("gqa_d128", [8, 2, 128], "16384", 0.5)])
  rows = [line for line in attention._summary(merged) if line.startswith("| M") or line.startswith("| G")]
  assert rows == [
      "| MHA d64, 4096 | 1.000 / 3.000 | 2.000 / 6.000 | 0.500 / 1.500 | n/a | 4.000 / 6.000 | 4.0x / 2.0x |",
      "| MHA d64, 65536 | 2.000 / 6.000 | 4.000 / 12.000 | 1.000 / 3.000 | n/a | 8.000 / 12.000 | 4.0x / 2.0x |",
      "| GQA 8q/2kv d128, 16384 | 0.500 / 1.500 | 1.000 / 3.000 | 0.250 / 0.750 | n/a | 2.000 / 3.000 | 4.0x / 2.0x |"]


def test_ab_jaxprs_table_marks_each_kernel(capsys):
  ab.compare_jaxprs({"n1024_static": ["a", "b", "c"], "n1024_gqa": "error: no groups"},
                    {"n1024_static": ["a", "x", "c"], "n1024_gqa": ["d", "e", "f"]})
  out = capsys.readouterr().out
  assert "| n1024_static | same | differs | same |" in out
  assert "| n1024_gqa | base: error: no groups; head: ok | | |" in out


def test_flex_from_files_joins_runs_and_refuses_overlaps_or_other_setups(tmp_path, capsys):
  """FlexAttention times for a merged table come from several of its own runs (flex_peer logs, or a
  results JSON's ``flex``); each shape and length from exactly one, all of one torch and of the
  kernel's mask."""
  setup = {"torch": "2.11", "window": 64, "offsets": [89, 144]}
  log = tmp_path / "flex.log"
  log.write_text("warning: noise\n" + json.dumps({**setup, "sizes": {"8,8,64": {"4096": {"fwd_ms": 1.0}}}}) + "\n"
                 + '{"torch": "2.11", "sizes": {"8,8,64": {"409')  # a last line cut off mid-write
  results = tmp_path / "attention.json"
  results.write_text(json.dumps({"flex": {**setup, "sizes": {"mha_d64": {"16384": {"fwd_ms": 2.0}},
                                                              "gqa_d128": {"16384": {"fwd_ms": 3.0}}}}}))
  join = lambda paths, shapes, window=64, offsets=(89, 144): attention.flex_from_files(  # noqa: E731
      paths, shapes, window, list(offsets))
  flex = join([log, results], ["mha_d64", "gqa_d64"])
  assert flex["sizes"] == {"mha_d64": {"4096": {"fwd_ms": 1.0, "source": "flex.log"},
                                       "16384": {"fwd_ms": 2.0, "source": "attention.json"}}}
  assert flex["torch"] == "2.11" and flex["source"] == "flex.log, attention.json"
  other_torch = tmp_path / "other.log"
  other_torch.write_text(json.dumps({**setup, "torch": "2.12", "sizes": {"8,8,64": {"65536": {"fwd_ms": 1.0}}}}))
  not_flex = tmp_path / "tune.json"
  not_flex.write_text(json.dumps({"rows": []}))
  for call, message in ((lambda: join([log, log], ["mha_d64"]), "already in an earlier"),
                        (lambda: join([log, other_torch], ["mha_d64"]), "torch 2.12"),
                        (lambda: join([log], ["mha_d64"], window=32), "give runs of the same mask"),
                        (lambda: join([log], ["mha_d64"], offsets=(89, 145)), "give runs of the same mask"),
                        (lambda: join([not_flex], ["mha_d64"]), "JSON without FlexAttention results"),
                        (lambda: join([log], ["mha_d128"]), "no benchmarks.flex_peer result")):
    with pytest.raises(SystemExit) as e:
      call()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], (message, err)


def test_attention_rewrite_cli_refuses_bad_files_in_one_line(tmp_path):
  def cli(*argv):
    return subprocess.run([sys.executable, "-m", "benchmarks.attention", *argv], capture_output=True, text=True)

  res = cli("--flex-log", str(tmp_path / "a.log"))
  assert res.returncode == 2 and res.stderr.strip() == "error: --flex-log only goes with --rewrite"
  run = tmp_path / "run.json"
  run.write_text("{}")
  res = cli("--rewrite", str(run), "--flex-log", str(run), str(tmp_path / "missing.log"))
  assert res.returncode == 2 and res.stderr.strip().splitlines() == [f"error: no such file: {tmp_path / 'missing.log'}"]


def test_attention_kernels_names_the_family_in_the_calls_and_the_files(tmp_path):
  """``--kernels mosaic``: the kernel's calls name the family (its defaults, not the Triton tuning
  knobs, which are refused beside it in one line), and its results files carry the name, so a run
  of one family never claims another's files."""
  q, offsets = np.zeros((1, 128, 8, 64), np.float32), np.zeros((2,), np.int32)
  assert attention.kernel_configs(q, q, offsets, None, None, "mosaic") == {"backend": "mosaic"}
  assert attention.kernel_configs(q, q, offsets, None, None) == {}
  assert [p.name for p in attention.outputs(tmp_path, "NVIDIA H200", "mosaic")] == [
      "attention_NVIDIA_H200_mosaic.json", "attention_NVIDIA_H200_mosaic.md"]
  assert [p.name for p in attention.outputs(tmp_path, "NVIDIA H200")] == ["attention_NVIDIA_H200.json",
                                                                          "attention_NVIDIA_H200.md"]
  res = subprocess.run([sys.executable, "-m", "benchmarks.attention", "--kernels", "mosaic", "--block", "64", "--out",
                        str(tmp_path / "out")], capture_output=True, text=True)
  assert res.returncode == 2 and res.stderr.strip().splitlines() == [
      "error: --block and --num-warps tune the default kernels' configs; --kernels runs a family's own defaults: "
      "give one or the other"]
  assert not (tmp_path / "out").exists()


def test_task_data_times_each_task_recipe_and_refuses_a_text_one():
  res = subprocess.run([sys.executable, "-m", "benchmarks.task_data", "--configs", "recall128", "--samples", "20",
                        "--repeats", "1", "--steps", "2"], capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  assert re.fullmatch(r"recall128: [\d.]+ ms/row, \d+ rows/s, [\d.]+ steps/s of 32 rows per core; "
                      r"pipeline [\d.]+ ms/step\n", res.stdout), res.stdout
  res = subprocess.run([sys.executable, "-m", "benchmarks.task_data", "--configs", "tiny"], capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 2 and "--configs tiny: this recipe trains on text alone" in res.stderr, res.stderr
