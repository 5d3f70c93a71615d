"""``benchmarks.floor`` without a GPU: its argument errors (one line, exit code 2), its table and JSON
from a made-up results dict (ratios, a missing peer's reason in place of a time), and its refusal
to overwrite results. Nothing is timed."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import floor

ROOT = pathlib.Path(__file__).resolve().parents[1]
NO_TOKAMAX = "tokamax not importable: ModuleNotFoundError: No module named 'tokamax'"


@pytest.mark.parametrize("argv, words", [
    (["--n", "x"], "invalid int value: 'x'"),
    (["--n", "0"], "--n takes sequence lengths of at least 1, got 0"),
    (["--n", "16384", "16384"], "each value once"),
    (["--shapes", "mha_d32"], "invalid choice: 'mha_d32'"),
    (["--reps", "0"], "--reps takes at least 1"),
])
def test_argument_errors_are_one_line(capsys, tmp_path, argv, words):
  with pytest.raises(SystemExit) as e:
    floor.main([*argv, "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
  assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_refused(capsys, tmp_path):
  out = tmp_path / "out"
  out.write_text("keep me\n")
  with pytest.raises(SystemExit) as e:
    floor.main(["--out", str(out)])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and err == [f"error: --out {out} is a file; give a folder"]
  assert out.read_text() == "keep me\n"


def _row(times: dict[str, float | None], errors: dict[str, str], check: dict, memory_ms: float = 0.5) -> dict:
  return {"num_offsets": 3, "fwd_ms": times, "memory_floor_ms": memory_ms, "memory_floor_bytes": 1 << 20,
          "check": check, "errors": errors}


def _results() -> dict:
  ok = _row({floor.CUDNN: 2.0, floor.TRITON: 3.0, floor.MOSAIC: 2.5, floor.LOADS: 1.0, floor.TOKAMAX: None},
            {floor.TOKAMAX: NO_TOKAMAX},
            {"Triton vs Mosaic": 1.5e-3, "tokamax vs cuDNN": f"{floor.TOKAMAX} failed"})
  nan = _row({floor.CUDNN: 8.0, floor.TRITON: 10.0, floor.MOSAIC: None, floor.LOADS: 4.0, floor.TOKAMAX: 6.0},
             {floor.MOSAIC: floor.NOT_FINITE},
             {"Triton vs Mosaic": f"{floor.MOSAIC} gave NaN or Inf", "tokamax vs cuDNN": 7.8e-3}, memory_ms=1.0)
  return {"device": "NVIDIA H200", "jax": "0.11.2", "copy_bandwidth_Bps": 4.3e12, "date": "2026-12-06",
          "command": "python -m benchmarks.floor --n 16384 65536 --shapes gqa_d64", "tokamax": NO_TOKAMAX,
          "config": dict(B=1, H=8, W=64, R=4096, dtype="bfloat16", offsets=[89, 144, 233], reps=20,
                         shapes={"gqa_d64": (8, 2, 64)}),
          "runs": {"gqa_d64": {"16384": ok, "65536": nan}}}


def _with_flex(results: dict) -> dict:
  """FlexAttention's result as ``benchmarks.attention.flex_peer`` returns it: 16384 measured, then stopped."""
  flex = {"torch": "2.11", "sizes": {"gqa_d64": {"16384": {"fwd_ms": 15.0, "fwd_bwd_ms": 40.0}}},
          "partial": "stopped after 240 s"}
  for n, row in results["runs"]["gqa_d64"].items():
    floor.add_flex(row, flex, "gqa_d64", int(n))
  return results


def _table_row(md: str, section: str, n: str) -> list[str]:
  """The cells of the row for ``n`` in the table under ``## section``."""
  table = md.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
  (line,) = [line for line in table.splitlines() if line.startswith(f"| gqa_d64 | {n} |")]
  return [cell.strip() for cell in line.strip("|").split(" | ")][2:]


def test_table_and_json_from_a_results_dict(tmp_path):
  results = _with_flex(_results())
  floor.write(results, tmp_path, echo=False)
  json_path, md_path = floor.outputs(tmp_path, "NVIDIA H200")
  assert (json_path.name, md_path.name) == ("floor_NVIDIA_H200.json", "floor_NVIDIA_H200.md")
  assert json.loads(json_path.read_text()) == json.loads(json.dumps(results))
  md = md_path.read_text()
  assert "Command: `python -m benchmarks.floor --n 16384 65536 --shapes gqa_d64`" in md
  ratios = dict(zip([label for label, _, _ in floor.RATIOS], _table_row(md, "Ratios", "16384")))
  assert ratios == {"Triton fwd / cuDNN window-only": "1.50x", "Mosaic fwd / cuDNN window-only": "1.25x",
                    "Mosaic fwd / load-only floor": "2.50x", "load-only / memory floor": "2.00x",
                    "tokamax local window / cuDNN window-only": "n/a", "FlexAttention / Mosaic fwd": "6.00x"}
  times = _table_row(md, "Times (median ms, forward)", "16384")
  columns = [*floor.COLUMNS, floor.MEMORY, *(label for label, _, _ in floor.CHECKS)]
  cells = dict(zip(columns, times))
  assert cells[floor.FLEX] == "15.000"
  assert cells[floor.CUDNN] == "2.000" and cells[floor.MEMORY] == "0.500" and cells["Triton vs Mosaic"] == "1.50e-03"
  assert cells[floor.TOKAMAX].startswith("failed: tokamax not importable: ModuleNotFoundError")
  assert cells["tokamax vs cuDNN"] == f"n/a ({floor.TOKAMAX} failed)"
  assert f"- gqa_d64, N = 16384, {floor.TOKAMAX}: {NO_TOKAMAX}" in md  # the reason in full under the tables


def test_a_nan_is_a_failure_not_a_time(tmp_path):
  floor.write(_with_flex(_results()), tmp_path, echo=False)
  md = floor.outputs(tmp_path, "NVIDIA H200")[1].read_text()
  columns = [*floor.COLUMNS, floor.MEMORY, *(label for label, _, _ in floor.CHECKS)]
  cells = dict(zip(columns, _table_row(md, "Times (median ms, forward)", "65536")))
  assert cells[floor.MOSAIC] == f"failed: {floor.NOT_FINITE}"
  assert cells[floor.FLEX] == "failed: stopped after 240 s"
  assert cells["Triton vs Mosaic"] == f"n/a ({floor.MOSAIC} gave NaN or Inf)"
  assert cells["tokamax vs cuDNN"] == "7.80e-03"
  ratios = _table_row(md, "Ratios", "65536")
  assert ratios == ["1.25x", "n/a", "n/a", "4.00x", "0.75x", "n/a"]


def test_a_reason_with_a_pipe_keeps_the_table_whole(tmp_path):
  results = _results()
  row = results["runs"]["gqa_d64"]["16384"]
  row["errors"][floor.TOKAMAX] = "ValueError: shape a|b"
  floor.write(results, tmp_path, echo=False)
  md = floor.outputs(tmp_path, "NVIDIA H200")[1].read_text()
  line = next(line for line in md.splitlines() if line.startswith("| gqa_d64 | 16384 |"))
  cells = line.replace("\\|", "").strip("|").split("|")
  assert "a\\|b" in line and len(cells) == 2 + len(floor.COLUMNS) + 1 + len(floor.CHECKS)


def test_reason_is_one_line():
  assert floor.reason(ValueError("first\nsecond")) == "ValueError: first"
  assert floor.reason(RuntimeError("")) == "RuntimeError"
  assert len(floor.reason(OSError("x" * 500))) == 200


@pytest.mark.parametrize("name", ["floor_cpu.json", "floor_cpu.md"])
def test_existing_results_are_refused_before_measuring(tmp_path, name):
  """On the CPU backend the device, and with it the file names, is "cpu" on a GPU machine too."""
  out = tmp_path / "out"
  out.mkdir()
  (out / name).write_text("kept")
  res = subprocess.run([sys.executable, "-m", "benchmarks.floor", "--n", "256", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  err = res.stderr.strip().splitlines()
  assert res.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), res.stderr[-2000:]
  assert str(out / name) in err[0] and "--force" in err[0]
  assert res.stdout == "" and (out / name).read_text() == "kept" and [p.name for p in out.iterdir()] == [name]


def test_a_run_without_flex_says_not_run(tmp_path):
  floor.write(_results(), tmp_path, echo=False)  # rows without a FlexAttention entry (--no-flex)
  md = floor.outputs(tmp_path, "NVIDIA H200")[1].read_text()
  cells = dict(zip([*floor.COLUMNS, floor.MEMORY], _table_row(md, "Times (median ms, forward)", "16384")))
  assert cells[floor.FLEX] == "not run" and f"{floor.FLEX}:" not in md
