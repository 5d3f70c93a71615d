"""What a new user tripped on (issue 27) and the one frame every command runs in (issue 26): a
summary that overwrote any file, Ctrl-C, two sweeps on one root, packed cells on an 80 GB GPU,
an unwritable root, a report that hid failures, wrong advice, and small things. Signals, locks and
exit codes are a process's behaviour, so those are tested on real processes."""

from __future__ import annotations

import argparse
import ast
import errno
import gc
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from train import cli
from train.data import prepare
from train.probe import evaluate
from train.run import checkpoint
from train.run.checkpoint import CheckpointError
from train.run.trainer import Interrupted
from train.study import packing, report, sweep
from tests.compile_cache import cached_env
from tests.test_sweep_report_errors import root  # noqa: F401  (a fixture: a root holding tests/conftest.py's cell)

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A run as small as a probe accepts (T = 128 holds a passkey sample), checkpoints at steps 1 and 2;
# the finished cell the report and probe tests copy is ``tests.test_sweep_report_errors``'.
TINY = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.head_dim=16", "model.mlp_dim=64",
        "model.seq_len=128", "model.window=8", "batch_size=8", "final_eval_tokens=512", "eval_batches=1", "steps=2",
        "checkpoint_every=1", "progress=false"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _python(*args: str, timeout: float = 300, cwd: pathlib.Path = ROOT, shell_prefix: str = "",
            env: dict[str, str] = ENV) -> subprocess.CompletedProcess:
  """``python -m ARGS`` in a process of its own (after ``shell_prefix``, e.g. a ``ulimit``)."""
  cmd = [sys.executable, "-m", *args]
  if shell_prefix:
    cmd = ["bash", "-c", f"{shell_prefix} && exec {' '.join(map(str, cmd))}"]
  return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _start(*args: str, env: dict[str, str] = ENV) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env)


def _one_error(code: int, err: str, status: int = 2) -> str:
  """The one line a stopped command prints on stderr: no traceback, nothing else."""
  assert code == status, err[-3000:]
  lines = [line for line in err.splitlines() if line.strip()]
  assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
  return lines[0]


def _files(folder: pathlib.Path) -> set[pathlib.Path]:
  return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}


def _processes_naming(text: str) -> list[int]:
  """Ids of the live processes whose command line holds ``text``."""
  found = []
  for cmdline in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
    try:
      if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
        found.append(int(cmdline.parent.name))
    except OSError:
      continue
  return found


@pytest.fixture
def damaged(root) -> pathlib.Path:
  """The cell of ``root`` with its newest checkpoint unreadable: every probe prints one warning
  line when it has restored the one before and then computes, a point to send Ctrl-C at."""
  workdir = root / "fib-linear-s0"
  newest = max((p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
  for path in (newest / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  return workdir


# ----------------------------------------------------------------------------- one frame for every command


def test_the_frame_turns_refusals_and_ctrl_c_into_one_line(capsys):
  parser = argparse.ArgumentParser(prog="tool")

  def raising(error: BaseException):
    def body(args: argparse.Namespace) -> int:
      raise error
    return body

  cases = [(ValueError("bad\n  value"), 2, "error: bad value"),
           (OSError(errno.EACCES, "Permission denied", "/x/y"), 2, "error: Permission denied: /x/y"),
           (CheckpointError("saving failed"), 2, "error: saving failed"),
           (Interrupted("interrupted at step 3; kept"), 130, "error: interrupted at step 3; kept"),
           (KeyboardInterrupt(), 130, "error: interrupted (Ctrl-C); kept")]
  for error, status, line in cases:
    assert cli.run_command(raising(error), parser, [], interrupted=lambda args: "kept") == status
    assert capsys.readouterr().err == line + "\n"
  with pytest.raises(RuntimeError):  # a bug keeps its traceback
    cli.run_command(raising(RuntimeError("bug")), parser, [])


def test_a_library_error_inside_a_message_is_what_failed_and_where():
  """``checkpoint.short``, the cause a message quotes: an OS error as ``what: path`` (not
  ``NotADirectoryError: [Errno 20] ...``), found through the errors raised from it."""
  try:
    try:
      raise NotADirectoryError(errno.ENOTDIR, "Not a directory", "/runs/afile/sub")
    except OSError as e:
      raise RuntimeError("orbax could not save") from e
  except RuntimeError as wrapped:
    assert checkpoint.short(wrapped) == "Not a directory: /runs/afile/sub"
  assert checkpoint.short(ValueError("x " * 200), limit=10).startswith("ValueError: ...")


def test_a_ctrl_c_dropped_in_a_gc_callback_still_stops_the_command(capsys):
  """Python drops an exception raised inside a garbage-collection callback (JAX registers one):
  the frame raises Ctrl-C again until the command stops, and prints no traceback for the drop."""
  parser = argparse.ArgumentParser(prog="tool")

  def body(args: argparse.Namespace) -> int:
    def callback(phase: str, info: dict) -> None:
      gc.callbacks.remove(callback)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.2)  # the handler raises here, inside the callback, and gc drops it

    gc.callbacks.append(callback)
    gc.collect()
    time.sleep(10)  # runs on to the end unless the dropped Ctrl-C is raised again
    return 0

  start = time.monotonic()
  assert cli.run_command(body, parser, []) == 130
  assert time.monotonic() - start < 5
  assert capsys.readouterr().err == "error: interrupted (Ctrl-C)\n"


def test_every_command_runs_in_the_frame_and_prints_no_error_line_itself():
  """No module of ``train`` but ``train.cli`` prints ``error: ...``; every ``main`` returns
  ``run_command(...)``, and every command module ends with ``exit_with(main())``."""
  printing, mains, guards = [], [], []
  for path in sorted((ROOT / "train").rglob("*.py")):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print" and node.args:
        first = node.args[0]
        text = first.value if isinstance(first, ast.Constant) else (
            first.values[0].value if isinstance(first, ast.JoinedStr) and isinstance(first.values[0], ast.Constant)
            else "")
        if isinstance(text, str) and text.startswith("error:") and path.name != "cli.py":
          printing.append(str(path.relative_to(ROOT)))
      if isinstance(node, ast.FunctionDef) and node.name == "main":
        calls = {getattr(c.func, "id", None) for c in ast.walk(node) if isinstance(c, ast.Call)}
        if "run_command" not in calls:
          mains.append(str(path.relative_to(ROOT)))
      if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
        guards.append((str(path.relative_to(ROOT)), ast.unparse(node.body[0])))
  assert printing == [] and mains == []
  assert len(guards) > 20 and [g for g in guards if g[1] != "exit_with(main())"] == []


def test_an_interrupted_command_leaves_at_once_with_its_output():
  """``cli.exit_with(130)`` flushes what was printed and ends the process without the interpreter's
  shutdown, which would wait for a running thread (and can crash where JAX's threads still run);
  another status exits as usual."""
  code = ("import threading, time; from train.cli import exit_with; "
          "threading.Thread(target=time.sleep, args=(120,), daemon={daemon}).start(); "
          "print('kept', end=''); exit_with({status})")
  start = time.monotonic()
  res = subprocess.run([sys.executable, "-c", code.format(daemon=False, status=130)], cwd=ROOT, capture_output=True,
                       text=True, timeout=100)
  assert (res.returncode, res.stdout) == (130, "kept") and time.monotonic() - start < 60, res.stderr
  res = subprocess.run([sys.executable, "-c", code.format(daemon=True, status=2)], cwd=ROOT, capture_output=True,
                       text=True, timeout=100)
  assert (res.returncode, res.stdout) == (2, "kept"), res.stderr


# ----------------------------------------------------------------------------- 1. the summary overwrote any file


def test_summary_never_replaces_a_file_it_did_not_write(root, tmp_path, capsys):
  config = root / "fib-linear-s0" / "config.json"
  before = config.read_bytes()
  line = _one_error(report.main([str(root), "--summary", str(config), "--force"]), capsys.readouterr().err)
  assert f"--summary {config} exists and was not written by python -m train.report" in line, line
  assert config.read_bytes() == before and not (root / "report.md").exists()  # refused before any report

  summary = tmp_path / "SUMMARY.md"
  assert report.main([str(root), "--summary", str(summary)]) == 0
  assert summary.read_text().splitlines()[0] == report.SUMMARY_MARK
  line = _one_error(report.main([str(root), "--summary", str(summary)]), capsys.readouterr().err)
  assert "add --force to replace it" in line, line
  assert report.main([str(root), "--summary", str(summary), "--force"]) == 0


# ----------------------------------------------------------------------------- 2. Ctrl-C


def test_ctrl_c_during_the_last_step_stops_before_the_final_evaluation(tmp_path):
  """Ctrl-C once step 1 is logged lands in step 2, the last, which compiles the held-out loss for
  seconds: the run stops there, as at any other step, instead of evaluating and exiting 0."""
  workdir = tmp_path / "run"
  # a compilation cache of this test's own, empty: the run compiles as long as ever; its resumption
  # below loads what it compiled (tests.compile_cache)
  env = cached_env(ENV, folder=tmp_path / "jax-cache")
  proc = _start("train", "--workdir", str(workdir), "--set", *TINY, "log_every=1", "eval_every=100",
                "checkpoint_every=100", env=env)
  metrics, deadline = workdir / "metrics.jsonl", time.monotonic() + 240
  while proc.poll() is None and time.monotonic() < deadline and not (
      metrics.exists() and any('"step": 1,' in x and '"loss"' in x for x in metrics.read_text().splitlines())):
    time.sleep(0.01)
  # step 1's line is written before its loop iteration ends: wait until the run is inside step 2 (its
  # held-out loss compiles for seconds), or a busy machine lets the signal land before step 2 starts
  time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  line = _one_error(proc.returncode, err, status=130)
  assert line.startswith("error: interrupted") and "kept" in line, line  # at step 2, its checkpoint kept
  assert not (workdir / "eval.json").exists() and not list(workdir.rglob("*.tmp"))
  assert _python("train", "--workdir", str(workdir), env=env).returncode == 0  # resumed: it evaluates and finishes
  assert (workdir / "eval.json").exists()


PROBES = {  # each computes for many seconds after restoring: Ctrl-C lands in its computation
    "train.evaluate": ["--lengths", "1", "--tokens", "4000000"],
    "train.budget": ["--lengths", "1", "--tokens", "4000000", "--budgets", "full"],
    "train.passkey": ["--lengths", "1", "--depths", "0.5", "--trials", "20000"],
    "train.latency": ["--repeats", "1000000"],
}


@pytest.mark.parametrize("module", list(PROBES))
def test_ctrl_c_stops_a_probe_in_one_line_and_writes_nothing(root, damaged, module):
  before = _files(root)
  target = [str(root)] if module == "train.latency" else ["--workdir", str(damaged)]
  proc = _start(module, *target, *PROBES[module])
  warning = proc.stderr.readline()
  assert warning.startswith("warning: checkpoint step ") and "is damaged" in warning, warning + proc.stderr.read()
  proc.send_signal(signal.SIGINT)
  start = time.monotonic()
  _, err = proc.communicate(timeout=120)
  assert time.monotonic() - start < 60
  assert _one_error(proc.returncode, err, status=130).startswith("error: interrupted (Ctrl-C)"), err
  assert _files(root) == before  # nothing written, not even a temporary file


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_sweep_is_refused_and_ctrl_c_stops_every_cell(tmp_path, sig):
  """3: one sweep at a time on a root; 2: a sweep stopped by Ctrl-C or SIGTERM (sent to it alone)
  stops its cells and leaves no process behind."""
  sweep_root = tmp_path / "sweep_root"
  args = ["train.sweep", "--root", str(sweep_root), "--config", "tiny", "--variants", "fib-linear", "--seeds", "0",
          "--no-latency", "--set", *TINY, "steps=100000", "checkpoint_every=100000"]
  first = _start(*args)
  config, deadline = sweep_root / "fib-linear-s0" / "config.json", time.monotonic() + 240
  while not config.exists() and first.poll() is None and time.monotonic() < deadline:
    time.sleep(0.2)  # the cell writes its config.json once it holds its workdir: it is training
  assert config.exists(), first.communicate(timeout=60)
  second = _python(*args, timeout=120)
  assert "another sweep is running on" in _one_error(second.returncode, second.stderr), second.stderr
  first.send_signal(sig)
  out, err = first.communicate(timeout=sweep.STOP_GRACE_S + 60)
  assert _one_error(first.returncode, err, status=130).startswith("error: interrupted (Ctrl-C)"), err
  assert "[sweep] stopping 1 running cell(s)" in out, out
  assert _processes_naming(str(sweep_root)) == []
  log = (sweep_root / "logs" / "fib-linear-s0.log").read_text()
  assert "error: interrupted at step" in log  # it stopped itself, and names the sweep, not train, to resume it
  assert "Resume with: the same train.sweep (or train.experiment) command" in log and "python -m train --workdir" not in log
  assert json.loads((sweep_root / "sweep_cost.jsonl").read_text().splitlines()[-1])["failed"] == 0


# ----------------------------------------------------------------------------- 4. packed cells on an 80 GB GPU


H100, H200 = 81559 * 2**20, 143771 * 2**20  # total memory as nvidia-smi reports it


@pytest.mark.parametrize("gpu", [H100, H200])
def test_packing_leaves_every_process_room_for_cuda(gpu):
  need, _ = packing.footprint(pathlib.Path("/nonexistent"), "small")
  plan = packing.plan(gpu, need, "default")
  assert 1 <= plan.per_gpu <= packing.DEFAULT_PER_GPU and plan.warning() is None
  pool = plan.fraction * gpu
  assert pool >= need  # each cell's XLA pool holds what the recipe needs
  assert plan.per_gpu * (pool + packing.RESERVE_BYTES) <= gpu  # and every process keeps its reserve


def test_every_recipe_has_a_footprint_and_the_recall_study_packs_without_a_warning():
  import configs  # noqa: PLC0415

  assert set(packing.RECIPE_FOOTPRINT) == set(configs.CONFIGS)  # a new recipe needs its own default
  need, where = packing.footprint(pathlib.Path("/nonexistent"), "recall128-long")
  assert "recall128-long recipe's default" in where
  assert packing.plan(H100, need, where, asked=21).warning() is None  # the 21 cells the study ran per H100


def test_packing_too_many_cells_is_named_with_the_fix():
  need, _ = packing.footprint(pathlib.Path("/nonexistent"), "small")
  plan = packing.plan(H100, need, "default", asked=14)
  assert plan.per_gpu == 14 and 14 * (plan.fraction * H100 + packing.RESERVE_BYTES) <= H100
  assert f"--per-gpu {plan.fits} fits" in plan.warning(), plan.warning()
  with pytest.raises(ValueError, match="--per-gpu 60: .* give --per-gpu"):
    packing.plan(H100, need, "default", asked=60)


def test_a_second_sweep_on_a_gpu_packs_into_the_memory_the_first_left():
  """Another sweep's 21 recall cells hold 74 GB of an 80 GB H100 (what the mixed study saw): a sweep
  started beside them sizes its cells to the free memory, not the card's."""
  need, where = packing.footprint(pathlib.Path("/nonexistent"), "recall128-long")
  free = H100 - 74 * 10**9
  plan = packing.plan(H100, need, where, free_bytes=free)
  assert plan.fits == free // (need + packing.RESERVE_BYTES) and plan.per_gpu == plan.fits
  assert plan.per_gpu * (plan.fraction * H100 + packing.RESERVE_BYTES) <= free  # pools and reserves fit what is free
  assert "GiB held by other processes" in plan.describe()
  assert packing.plan(H100, need, where, free_bytes=H100).per_gpu == packing.DEFAULT_PER_GPU
  with pytest.raises(ValueError, match="free on the GPU; give --per-gpu"):
    packing.plan(H100, need, where, asked=8, free_bytes=free)


def test_a_cells_measured_peak_sizes_the_packing(cell, tmp_path):
  assert "peak_bytes" in json.loads((cell / "cell.json").read_text())  # recorded (None on CPU)
  for name, peak in (("a-s0", 3 * 2**30), ("b-s0", 5 * 2**30), ("c-s0", None)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "cell.json").write_text(json.dumps({"peak_bytes": peak}))
  need, where = packing.footprint(tmp_path, "small")
  assert need == int(5 * 2**30 * packing.FOOTPRINT_MARGIN) and "measured" in where


FAKE_CELL = """import os, pathlib, sys
workdir, failures = pathlib.Path(sys.argv[1]), int(sys.argv[2])
workdir.mkdir(parents=True, exist_ok=True)
tries = len(list(workdir.glob("try*"))) + 1
(workdir / f"try{tries}").write_text(os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"])
if tries <= failures:
  print("INTERNAL: Failed to initialize BlasLt: BlasLt is unavailable")
  sys.exit(1)
(workdir / "cell.json").write_text("{}")
"""


@pytest.mark.parametrize("failures", [1, 2])
def test_a_transient_cuda_error_is_retried_once_then_named_with_the_fix(tmp_path, monkeypatch, capsys, failures):
  """Cells as real processes that meet ``BlasLt is unavailable`` ``failures`` times, on one 80 GB GPU."""
  monkeypatch.setattr(sweep, "local_gpus", lambda: ["0"])
  monkeypatch.setattr(packing, "gpu_memory", lambda gpus, field="memory.total": packing.DEFAULT_GPU_BYTES)
  monkeypatch.setattr(sweep, "command", lambda c, recipe, budgets: [sys.executable, "-c", FAKE_CELL, str(c.workdir),
                                                                      str(failures)])
  sweep_root = tmp_path / "sweep_root"
  failed = sweep.run_sweep(sweep_root, "tiny", ["dense"], [0], TINY, latency=False, poll_s=0.05)
  out = capsys.readouterr().out
  workdir = sweep_root / "dense-s0"
  plan = packing.plan(packing.DEFAULT_GPU_BYTES, packing.RECIPE_FOOTPRINT["tiny"], "default")
  assert {p.read_text() for p in workdir.glob("try*")} == {f"{plan.fraction:.3f}"}
  assert "dense-s0 met 'BlasLt is unavailable' (exit 1); starting it once more" in out, out
  if failures == 1:
    assert failed == 0 and (workdir / "cell.json").exists()
  else:
    assert failed == 1 and len(list(workdir.glob("try*"))) == 2  # once more, not again and again
    line = next(x for x in out.splitlines() if "failed (exit 1, after a retry)" in x)
    assert f"fewer cells per GPU leave each more memory, e.g. --per-gpu {plan.per_gpu // 2}" in line, line
    cost = json.loads((sweep_root / "sweep_cost.jsonl").read_text().splitlines()[-1])
    assert cost["failed_cells"] == ["dense-s0"] and cost["per_gpu"] == plan.per_gpu


# ----------------------------------------------------------------------------- 5. an unwritable root


@pytest.mark.parametrize("module", ["train.report", "train.latency"])
def test_an_unwritable_root_is_one_line_before_anything_is_measured(root, module):
  """``ulimit -f 0``: no file can be written (permission bits would not stop root, who runs the tests)."""
  res = _python(module, str(root), shell_prefix="ulimit -f 0")
  line = _one_error(res.returncode, res.stderr)
  assert f"cannot write into the sweep root {root}" in line, line
  assert res.stdout == "" and not (root / "report.md").exists() and not (root / "latency.json").exists()


# ----------------------------------------------------------------------------- 6. the report hid failures


def test_the_report_names_unfinished_cells_and_why_a_claim_has_no_numbers(root, cell):
  (root / "dense-s0").mkdir()
  shutil.copy(cell / "config.json", root / "dense-s0" / "config.json")
  (root / "logs").mkdir()
  (root / "logs" / "dense-s0.log").write_text("error: something\n")
  (root / "sweep_cost.jsonl").write_text(json.dumps({"time": 0, "wall_s": 10, "cells_run": 1, "failed": 1,
                                                     "failed_cells": ["dense-s0"], "gpus": 0, "per_gpu": 7}) + "\n")
  assert report.main([str(root)]) == 0
  text = (root / "report.md").read_text()
  row = next(x for x in text.splitlines() if x.startswith("| `dense-s0`"))
  assert "failed in the last sweep" in row and "logs/dense-s0.log" in row, row
  claim5 = next(x for x in text.splitlines() if x.startswith("| 5."))
  assert "None" not in claim5 and "no finished run of a dense variant" in claim5, claim5
  assert "`?`" not in text and "No `sweep.json` in this root" in text
  cost = next(x for x in text.splitlines() if x.startswith("| 1 |"))  # 8: no "cells per GPU 7" on a CPU
  assert cost.endswith("| 1 (dense-s0) | 0 | - (one cell at a time) |"), cost


# ----------------------------------------------------------------------------- 7. wrong advice


def test_evaluate_data_errors_give_the_right_advice(cell, tmp_path, capsys):
  (tmp_path / "short.txt").write_text("too short")
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "text").mkdir()
  (tmp_path / "text" / "a.txt").write_text("Some text to prepare. " * 50)
  prepare.prepare(tmp_path / "text", tmp_path / "prepared")
  expected = {"short.txt": "holds 10 tokens, fewer than one window of T=128 plus one: give --data with more text",
              "empty.txt": "no evaluation text", "prepared": "is a prepared token folder (python -m train.prepare); "
                                                           "evaluation reads text"}
  for name, message in expected.items():
    code = evaluate.main(["--workdir", str(cell), "--lengths", "1", "--data", str(tmp_path / name)])
    line = _one_error(code, capsys.readouterr().err)
    assert message in line and "at most 0" not in line and "training text" not in line, line


def test_generate_names_a_prompt_that_is_not_utf8(cell):
  res = subprocess.run([sys.executable, "-m", "train.generate", "--workdir", str(cell), "--prompt", b"ab\xff"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
  line = _one_error(res.returncode, res.stderr)
  assert "--prompt is not UTF-8 text (byte 0xff at character 2)" in line and "codec" not in line, line


# ----------------------------------------------------------------------------- 8. small things


def test_the_eta_counts_down_between_progress_and_goes_when_nothing_is_left():
  eta = sweep.Eta(start=0.0, start_share=0.0)
  assert eta(0.0, 10.0) is None
  assert eta(0.5, 100.0) == pytest.approx(100.0)
  assert eta(0.5, 130.0) == pytest.approx(70.0)  # no progress for 30 s: 30 s less left, not more
  assert eta(0.5, 500.0) == 0.0
  assert "ETA 70 s" in sweep.status_line([], 1, 0, 0, 130.0, 70.0)
  assert "ETA" not in sweep.status_line([], 0, 0, 0, 130.0, 0.0)


@pytest.mark.parametrize("module", ["train.sweep", "train.experiment"])
def test_help_keeps_the_example_commands_as_written(module):
  res = _python(module, "--help", timeout=120)
  assert res.returncode == 0 and " \\\n" in res.stdout, res.stdout[:1500]  # the continuation line stays
  assert not re.search(r"\S {3,}--", res.stdout), res.stdout[:1500]


def test_prepare_prints_no_blank_lines_before_its_result(tmp_path):
  (tmp_path / "a.txt").write_text("hello world, " * 2000)
  res = _python("train.prepare", "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--tokenizer",
                "bpe", "--bpe-vocab-size", "300", timeout=120)
  assert res.returncode == 0 and res.stdout.startswith("prepared "), repr(res.stdout[:300])


@pytest.mark.parametrize("values", [[3.62, 3.71, 3.98, 4.41], [1.5, 40.0, 900.0]])
def test_perplexity_tick_labels_are_evenly_spaced_and_alike(values):
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots()
  ax.plot(range(len(values)), values)
  report.perplexity_axis(ax)
  fig.canvas.draw()
  lo, hi = ax.get_ylim()
  shown = [(t, label.get_text()) for t, label in zip(ax.get_yticks(), ax.get_yticklabels()) if lo <= t <= hi]
  ticks, labels = [t for t, _ in shown], [x for _, x in shown if x]
  pixels = ax.transData.transform([(0, t) for t in ticks])[:, 1]
  assert len(ticks) >= 2 and np.allclose(np.diff(pixels), np.diff(pixels)[0], rtol=1e-6), ticks
  assert len(labels) == len(ticks) and len({len(x.split(".")[-1]) if "." in x else 0 for x in labels}) == 1, labels
  assert not [t for t in ax.yaxis.get_minorticklabels() if t.get_text()]
  plt.close(fig)


def test_repeated_set_flags_add_up_in_every_command():
  """``--set steps=10 --set seed=2`` keeps both (argparse's default kept only the last, silently
  training 300 steps); every command taking recipe overrides builds ``--set`` with ``cli.add_overrides``."""
  parser = argparse.ArgumentParser()
  cli.add_overrides(parser, "overrides")
  assert parser.parse_args(["--set", "steps=10", "--set", "seed=2", "lr=1e-3"]).set == ["steps=10", "seed=2", "lr=1e-3"]
  assert parser.parse_args([]).set == []  # the default list is never extended in place
  root = pathlib.Path(__file__).resolve().parents[1]
  for module in ("train/__main__.py", "train/study/sweep.py", "train/study/experiment.py"):
    calls = [n for n in ast.walk(ast.parse((root / module).read_text())) if isinstance(n, ast.Call)]
    assert any(getattr(c.func, "id", None) == "add_overrides" for c in calls), module
    assert not any(isinstance(a, ast.Constant) and a.value == "--set" for c in calls
                   if getattr(c.func, "attr", None) == "add_argument" for a in c.args), module


@pytest.mark.parametrize("argv, resume", [(["--workdir", "runs/x"], "python -m train --workdir runs/x"),
                                          ([], "python -m train and the same flags")])
def test_ctrl_c_outside_the_training_loop_says_how_to_resume(monkeypatch, capsys, argv, resume):
  """Ctrl-C during the final evaluation (outside the loop, whose own stop names its checkpoint) ends
  with one line that still says how to resume."""
  import train.__main__ as train_main  # noqa: PLC0415

  def interrupted(args):
    raise KeyboardInterrupt

  monkeypatch.setattr(train_main, "train_and_report", interrupted)
  assert train_main.main(argv) == 130
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: interrupted (Ctrl-C); the checkpoints saved before it are kept; resume with: {resume}"]


def test_running_a_finished_run_again_says_nothing_was_trained(base_run, tmp_path):
  """``python -m train`` on a finished run trains nothing and says so (with how to train on); one
  resumed from a checkpoint says where it resumed."""
  from tests.test_reliability import BASE  # noqa: PLC0415
  from tests.test_train import _run  # noqa: PLC0415

  workdir = tmp_path / "run"
  shutil.copytree(base_run, workdir)
  again = _run(workdir, *BASE)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "was already trained to step 8" in again.stdout and "nothing trained now (--set steps=N with N > 8" in again.stdout
  longer = _run(workdir, *BASE[1:], "steps=10")
  assert longer.returncode == 0, longer.stderr[-3000:]
  assert "for 10 steps, resumed at step 8 in" in longer.stdout


# ----------------------------------------------------------------------------- the second review


def test_a_sweep_never_trains_into_committed_results(tmp_path, capsys):
  """A root whose finished cells have no checkpoints (committed under ``results/``) takes no sweep,
  with the default variants (which the committed root did not use) or any other: one line, nothing written."""
  committed = tmp_path / "small"
  (committed / "dense-s0").mkdir(parents=True)
  (committed / "dense-s0" / "cell.json").write_text("{}")
  (committed / "sweep.json").write_text(json.dumps({"config": "tiny", "overrides": TINY}))
  before = {p: p.read_bytes() for p in committed.rglob("*") if p.is_file()}
  for flags in ([], ["--variants", "dense", "--seeds", "0", "1"], ["--list"]):
    line = _one_error(sweep.main(["--root", str(committed), "--config", "tiny", "--set", *TINY, *flags]),
                      capsys.readouterr().err)
    assert f"{committed} holds committed results (dense-s0 is finished but its checkpoints were not kept)" in line
    assert line.endswith("give a new --root, or add --extend to train the missing cells beside them"), line
  assert {p: p.read_bytes() for p in committed.rglob("*") if p.is_file()} == before
  # asked for, a sweep lists (and would train) the missing cells and leaves the finished one alone
  assert sweep.main(["--root", str(committed), "--config", "tiny", "--set", *TINY, "--variants", "dense",
                     "--seeds", "0", "1", "--list", "--extend"]) == 0
  listed = [line.split(" --workdir ")[1].split()[0] for line in capsys.readouterr().out.splitlines()]
  assert listed == [str(committed.absolute() / "dense-s1")]
  assert {p: p.read_bytes() for p in committed.rglob("*") if p.is_file()} == before


def test_a_cell_trained_without_a_checkpoint_is_named_before_a_sweep_starts(tmp_path, capsys):
  """A cell whose training finished (``eval.json``) but whose checkpoints are gone (a device's time ended in
  its probes) can be neither probed nor trained again in place: the sweep and its ``--list`` name it, write nothing."""
  root = tmp_path / "r"
  (root / "dense-s1").mkdir(parents=True)
  (root / "dense-s1" / "eval.json").write_text("{}")
  (root / "sweep.json").write_text(json.dumps({"config": "tiny", "overrides": TINY}))
  before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
  for flags in ([], ["--list"]):
    line = _one_error(sweep.main(["--root", str(root), "--config", "tiny", "--set", *TINY, "--variants", "dense",
                                  "--seeds", "0", "1", "--extend", *flags]), capsys.readouterr().err)
    assert line == (f"error: dense-s1 under {root} finished training but kept no checkpoint, so their probes cannot "
                    "run: move those folders out of the root to train them again"), line
  assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_a_sweep_run_again_takes_the_roots_variants_and_seeds_and_more_seeds_add_up(tmp_path, capsys):
  """``sweep.json`` records the variants and seeds asked for: a sweep run again without them
  continues those cells (not the nine default variants), and ``--seeds`` adds seeds to them."""
  sweep_root = tmp_path / "r"
  sweep.check_root(sweep_root, {"config": "tiny", "overrides": TINY, "variants": ["dense", "window"], "seeds": [0]})
  assert sweep.asked_grid(sweep_root, None, None) == (["dense", "window"], [0])
  assert sweep.main(["--root", str(sweep_root), "--config", "tiny", "--list", "--set", *TINY]) == 0
  listed = [line.split(" --workdir ")[1].split()[0] for line in capsys.readouterr().out.splitlines()]
  assert listed == [str(sweep_root.absolute() / c) for c in ("dense-s0", "window-s0")]
  sweep.check_root(sweep_root, {"config": "tiny", "overrides": TINY, "variants": ["dense"], "seeds": [1, 0]})
  assert sweep.asked_grid(sweep_root, None, None) == (["dense", "window"], [0, 1])
  assert sweep.asked_grid(sweep_root, ["dense"], [2]) == (["dense"], [2])  # flags given: those cells alone
  assert sweep.asked_grid(tmp_path / "new", None, None) == (list(sweep.DEFAULT_VARIANTS), [0, 1, 2])
  older = tmp_path / "older"  # a sweep.json recording no variants or seeds: the cells the root holds
  for cell in ("window-s3", "dense-s1", "window-s3-rerun1", "logs", "plots"):
    (older / cell).mkdir(parents=True)
  (older / "sweep.json").write_text(json.dumps({"config": "tiny", "overrides": TINY}))
  assert sweep.asked_grid(older, None, None) == (["dense", "window"], [1, 3])


def test_a_sweep_run_again_without_flags_continues_the_roots_recipe(tmp_path, capsys):
  """Without ``--config`` and ``--set`` a sweep takes the root's recipe (here ``tiny`` with its overrides),
  as it takes the root's variants and seeds; on a new root the recipe is ``small``."""
  sweep.check_root(tmp_path / "r", {"config": "tiny", "overrides": TINY, "variants": ["dense"], "seeds": [3]})
  assert sweep.main(["--root", str(tmp_path / "r"), "--list"]) == 0
  (line,) = capsys.readouterr().out.strip().splitlines()
  assert "--config tiny --variant dense --seed 3 --set " + " ".join(TINY) in line, line
  assert sweep.asked_recipe(tmp_path / "new", None, []) == ("small", [])
  assert sweep.asked_recipe(tmp_path / "r", None, ["steps=5"]) == ("tiny", ["steps=5"])


def test_sweep_list_writes_nothing_so_a_preview_locks_no_recipe(tmp_path, capsys):
  fresh = tmp_path / "fresh"
  for steps in ("steps=2", "steps=3"):  # a preview, then another recipe on the same root
    assert sweep.main(["--root", str(fresh), "--config", "tiny", "--variants", "dense", "--seeds", "0", "--list",
                       "--set", *TINY, steps]) == 0
    assert f"--set {' '.join(TINY)} {steps} progress=false" in capsys.readouterr().out
    assert not fresh.exists()


@pytest.fixture
def default_handlers():
  """Each signal of ``cli.AS_CTRL_C`` at its default handler for the test (a CI runner under nohup
  starts with SIGHUP ignored), restored after."""
  before = {sig: signal.signal(sig, signal.SIG_DFL) for sig in cli.AS_CTRL_C}
  yield
  for sig, handler in before.items():
    signal.signal(sig, handler)


@pytest.mark.parametrize("sig", cli.AS_CTRL_C)
def test_sigterm_and_sighup_stop_a_command_as_ctrl_c_does(capsys, sig, default_handlers):
  parser = argparse.ArgumentParser(prog="tool")

  def body(args: argparse.Namespace) -> int:
    os.kill(os.getpid(), sig)
    time.sleep(10)  # runs on to the end unless the signal stops it
    return 0

  start = time.monotonic()
  assert cli.run_command(body, parser, [], interrupted=lambda args: "kept") == 130
  assert time.monotonic() - start < 5 and capsys.readouterr().err == "error: interrupted (Ctrl-C); kept\n"
  assert signal.getsignal(sig) is signal.SIG_DFL  # the frame's handler goes with it


def test_a_signal_the_command_was_started_to_ignore_stays_ignored(default_handlers):
  """Under ``nohup`` SIGHUP is ignored: a command keeps ignoring it (a closed terminal does not stop it)."""
  signal.signal(signal.SIGHUP, signal.SIG_IGN)
  seen = []

  def body(args: argparse.Namespace) -> int:
    seen.append((signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGTERM)))
    os.kill(os.getpid(), signal.SIGHUP)
    return 0

  assert cli.run_command(body, argparse.ArgumentParser(prog="tool"), []) == 0
  assert seen[0][0] is signal.SIG_IGN and seen[0][1] not in (signal.SIG_IGN, signal.SIG_DFL)
  assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


@pytest.mark.parametrize("impl, fix", [("attention_impl=cudnn", "use --set model.attention_impl=xla"),
                                       ("norm_impl=pallas", "or add model.interpret=true"),
                                       ("decode_impl=pallas", "use --set model.decode_impl=xla")])
def test_an_implementation_this_backend_lacks_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch,
                                                                                      impl, fix):
  """On a CPU: cuDNN, or a Pallas kernel without interpret mode (decoding's would fail only after
  training, in generation), in ``python -m train`` and in a sweep, before its folder is made."""
  import train.__main__ as train_main  # noqa: PLC0415

  workdir = tmp_path / "e7"
  line = _one_error(train_main.main(["--config", "tiny", "--variant", "dense", "--workdir", str(workdir), "--set",
                                     f"model.{impl}", "steps=2"]), capsys.readouterr().err)
  assert line.startswith(f"error: model.{impl} needs a GPU") and fix in line, line
  assert not workdir.exists()
  monkeypatch.setattr(sweep, "local_gpus", lambda: [])
  line = _one_error(sweep.main(["--root", str(tmp_path / "r"), "--config", "tiny", "--variants", "dense", "--set",
                                *TINY, f"model.{impl}"]), capsys.readouterr().err)
  assert line.startswith(f"error: model.{impl} needs a GPU") and not (tmp_path / "r").exists()


def test_a_probe_of_a_committed_run_says_its_checkpoints_were_not_kept(tmp_path, capsys):
  """A finished run without checkpoints (committed under ``results/``) cannot be probed: the line
  says so and gives the command that trains it again in a new workdir, not a refused resume."""
  workdir = tmp_path / "dense-s0"
  workdir.mkdir()
  for name in ("config.json", "eval.json", "cell.json"):
    shutil.copy(ROOT / "results" / "small" / "dense-s0" / name, workdir / name)
  line = _one_error(evaluate.main(["--workdir", str(workdir)]), capsys.readouterr().err)
  assert "is a finished run whose checkpoints were not kept (committed results)" in line, line
  assert line.endswith("python -m train --config small --variant dense --workdir runs/dense-s0 --set seed=0"), line


def test_a_variant_given_twice_is_refused(tmp_path, capsys):
  import train.__main__ as train_main  # noqa: PLC0415

  workdir = tmp_path / "run"
  line = _one_error(train_main.main(["--variant", "fib-linear", "--workdir", str(workdir), "--set",
                                     "model.variant=dense", "steps=2"]), capsys.readouterr().err)
  assert line == "error: --variant fib-linear and --set model.variant=dense name two variants: give one of them"
  assert not workdir.exists()


def test_the_readme_summary_command_names_the_roots_the_committed_summary_was_built_from():
  """``train/README.md``'s command for the committed verdicts rebuilds ``results/SUMMARY.md`` from the
  roots the file says it was built from, in the same order."""
  root = pathlib.Path(__file__).resolve().parents[1]
  readme = (root / "train" / "README.md").read_text()
  command = re.search(r"python -m train\.report (results/[^\n]*(?:\\\n[^\n]*)*?)--summary results/SUMMARY\.md", readme)
  assert command, "train/README.md has no command for results/SUMMARY.md"
  built = re.search(r"Built by `python -m train\.report (.*?) --summary", (root / "results" / "SUMMARY.md").read_text())
  assert built, "results/SUMMARY.md names no command"
  assert command.group(1).replace("\\\n", " ").split() == built.group(1).split()
