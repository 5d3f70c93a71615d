"""The Nsight Compute report of benchmarks.profile_attention: parsing ncu's CSV, the table, bad input."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from benchmarks import profile_attention as pa

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value","Rule Name","Rule Type",'
          '"Rule Description"')


def _row(launch: int, kernel: str, section: str, name: str, unit: str, value: str, rule: str = "") -> str:
  cells = [str(launch), "41", "python3", "host", kernel, "1", "7", "(128, 1, 1)", "(1024, 1, 8)", "0", "9.0",
           section, name, unit, value, *(rule.split(": ", 1) if rule else ["", ""])]
  cells.insert(-1, "OPT" if rule else "")
  return ",".join(f'"{c}"' for c in cells)


NCU_OUTPUT = "\n".join([
    "==PROF== Connected to process 41",
    '{"device": "NVIDIA H200", "jax": "0.11.2"}',
    "==PROF== Disconnected from process 41",
    HEADER,
    _row(0, "fib_attention_fwd", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "15.1"),
    _row(0, "fib_attention_fwd", "Command line profiler metrics", "gpu__time_duration.sum", "ns", "363,232"),
    _row(0, "fib_attention_fwd", "Command line profiler metrics", "dram__bytes_read.sum", "byte", "201,400,000"),
    _row(0, "fib_attention_fwd", "Occupancy", "Achieved Occupancy", "%", "18.4"),
    _row(0, "fib_attention_fwd", "Occupancy", "", "", "", "TheoreticalOccupancy: limited by registers"),
    _row(1, "loop_add_fusion", "Command line profiler metrics", "gpu__time_duration.sum", "ns", "1,000"),
    _row(1, "loop_add_fusion", "Launch Statistics", "Registers Per Thread", "register/thread", "24"),
]) + "\n"


def test_ncu_csv_parses_per_launch_in_order():
  kernels = pa.parse_ncu_csv(NCU_OUTPUT)
  assert [k["kernel"] for k in kernels] == ["fib_attention_fwd", "loop_add_fusion"]
  fwd = kernels[0]
  assert fwd["metrics"]["gpu__time_duration.sum"] == 363232.0  # thousands separators read
  assert fwd["metrics"]["Achieved Occupancy"] == 18.4
  assert fwd["rules"] == ["TheoreticalOccupancy: limited by registers"]
  assert pa.parse_ncu_csv("no csv here\n") == []


def test_summary_scales_units_and_leaves_missing_counters_empty():
  rows = pa.summarise(pa.parse_ncu_csv(NCU_OUTPUT))
  assert abs(rows[0]["us"] - 363.232) < 1e-9 and abs(rows[0]["DRAM read MB"] - 201.4) < 1e-9
  assert rows[0]["DRAM %"] == 15.1 and rows[0]["L2 MB"] is None
  assert rows[1]["registers"] == 24.0
  assert rows[0]["rules"] == ["TheoreticalOccupancy: limited by registers"] and rows[1]["rules"] == []


def test_report_lists_main_kernels_and_errors():
  kernels = pa.summarise(pa.parse_ncu_csv(NCU_OUTPUT))
  results = {"device": "NVIDIA H200", "jax": "0.11.2", "n": 65536, "date": "2026-11-30", "command": "cmd",
             "bytes": {"mha_d64": pa.tensor_bytes(65536, "mha_d64")},
             "shapes": {"mha_d64": {"fib static fwd": {"kernels": kernels},
                                    "cuDNN window only fwd": {"error": "stopped after 100 s"}}}}
  md = pa.render(results)
  assert "| fib static fwd | fib_attention_fwd | 363.2 | 201.4 |" in md
  assert "loop_add_fusion" not in md  # under 1% of the call's kernel time
  assert "| cuDNN window only fwd | error: stopped after 100 s |" in md
  # Q, K, V, O of 8 heads x 64 in bf16 at 65536 = 268.4 MB; the SPEC floor reads K and V 9 times
  assert "Q, K, V and O once: 268.4 MB" in md and "1342.2 MB" in md


def test_missing_profiler_is_one_line_exit_2():
  res = subprocess.run([sys.executable, "-m", "benchmarks.profile_attention", "--ncu", "/no/such/ncu"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 2
  assert res.stderr.strip().splitlines() == ["error: Nsight Compute not found ('/no/such/ncu'); install it or pass "
                                             "--ncu PATH"]
