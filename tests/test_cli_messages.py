"""The read-only tools' messages on bad input name the argument the user gave and how to fix it:
one ``error:`` line (exit 2), nothing in the run changed."""

import json
import pathlib
import shutil

import pytest

from configs.base import apply_overrides
from tests.test_reliability import _error_line
from tests.test_sweep_report_errors import _one_error, _snapshot
from tests.test_train import _cfg, _run
from train.probe import evaluate, generate, passkey
from train.study import latency


def test_evaluate_lengths_beyond_the_text_name_lengths(base_run, capsys):
  before = _snapshot(base_run)
  line = _one_error(evaluate.main(["--workdir", str(base_run), "--lengths", "100000", "--tokens", "64"]),
                    capsys.readouterr().err)
  assert "--lengths 100000 need 6,400,001 consecutive tokens" in line and "lower --lengths" in line, line
  assert "seq_len" not in line, line
  assert _snapshot(base_run) == before


def test_evaluate_sorts_and_deduplicates_lengths(base_run, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(base_run, workdir)
  assert evaluate.main(["--workdir", str(workdir), "--lengths", "2", "1", "2", "--tokens", "128"]) == 0
  out = capsys.readouterr().out
  assert out.index("1x T=64") < out.index("2x T=128"), out
  path = workdir / "evals" / "step8_heldout_x1-2_t128.json"
  record = json.loads(path.read_text())
  assert record["multiples"] == [1, 2]
  assert record["1x"]["ppl_rise_vs_1x"] == 0.0  # the shortest length is the baseline
  assert record["2x"]["ppl_rise_vs_1x"] == pytest.approx(record["2x"]["ppl"] / record["1x"]["ppl"] - 1)


def test_rise_is_named_by_its_baseline(base_run, tmp_path):
  """Without 1x T the rise is against the shortest length, and its field says which."""
  workdir = tmp_path / "run"
  shutil.copytree(base_run, workdir)
  assert evaluate.main(["--workdir", str(workdir), "--lengths", "2", "4", "--tokens", "256"]) == 0
  record = json.loads((workdir / "evals" / "step8_heldout_x2-4_t256.json").read_text())
  assert "ppl_rise_vs_1x" not in record["2x"] and record["2x"]["ppl_rise_vs_2x"] == 0.0
  assert record["4x"]["ppl_rise_vs_2x"] == pytest.approx(record["4x"]["ppl"] / record["2x"]["ppl"] - 1)


@pytest.mark.parametrize("tool, extra", [(evaluate, []), (passkey, []), (generate, ["--prompt", "The"])])
def test_workdir_naming_a_file_says_it_is_a_file(base_run, capsys, tool, extra):
  config = base_run / "config.json"
  line = _one_error(tool.main(["--workdir", str(config), *extra]), capsys.readouterr().err)
  assert f"--workdir {config} is a file, not a run folder" in line and "does not exist" not in line, line


def test_a_run_trained_on_gpu_kernels_is_probed_on_a_cpu(base_run, tmp_path, capsys):
  """A run whose config names Pallas kernels (a GPU run copied to a CPU machine) is read through
  implementations the CPU has; its config.json stays as it trained."""
  workdir = tmp_path / "run"
  shutil.copytree(base_run, workdir)
  saved = json.loads((workdir / "config.json").read_text())
  saved["model"].update(attention_impl="pallas", attention_kernels="triton", norm_impl="pallas")
  (workdir / "config.json").write_text(json.dumps(saved))
  before = (workdir / "config.json").read_text()
  assert evaluate.main(["--workdir", str(workdir), "--lengths", "1", "--tokens", "64"]) == 0, capsys.readouterr().err
  assert (workdir / "config.json").read_text() == before


def test_the_cpu_refusal_of_pallas_kernels_names_a_fix_that_is_accepted():
  """With a kernel family set, ``model.attention_impl=xla`` alone would be refused next (the family
  names Pallas kernels): the advice drops it too."""
  cfg = _cfg("model.attention_impl=pallas", "model.attention_kernels=triton")
  with pytest.raises(ValueError, match="needs a GPU") as refusal:
    cfg.check_backend("cpu")
  fix = str(refusal.value).split("use --set ", 1)[1].split(",")[0].split()
  assert fix == ["model.attention_impl=xla", "model.attention_kernels=null"], str(refusal.value)
  apply_overrides(cfg, fix).validate().check_backend("cpu")


def test_bpe_without_its_vocab_size_says_what_to_add(tmp_path):
  line = _error_line(_run(tmp_path / "run", "tokenizer=bpe", timeout=120))
  assert "must equal bpe_vocab_size (4096)" in line and "add model.vocab_size=4096" in line, line
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--lengths", "0"], "--lengths are multiples of T and must be >= 1, got 0"),
    (["--depths", "1.5"], "--depths must be within [0, 1]"),
    (["--trials", "0"], "--trials must be >= 1, got 0"),
])
def test_passkey_names_the_argument_out_of_range(tmp_path, capsys, args, message):
  line = _one_error(passkey.main(["--workdir", str(tmp_path), *args]), capsys.readouterr().err)
  assert line.startswith(f"error: {message}"), line


def test_passkey_length_too_short_names_lengths_and_its_minimum(base_run, capsys):
  before = _snapshot(base_run)
  line = _one_error(passkey.main(["--workdir", str(base_run), "--lengths", "1", "--depths", "0.5", "--trials", "1"]),
                    capsys.readouterr().err)
  assert "--lengths 1 gives 64-token samples (T=64)" in line and "give --lengths of 2 or more" in line, line
  assert _snapshot(base_run) == before


@pytest.mark.parametrize("tool", ["latency", "report"])
def test_a_run_given_as_a_sweep_root_is_named_with_its_root_or_as_a_single_run(tmp_path, capsys, tool):
  """A cell names its root; a run of ``python -m train`` has none, so its parent (a folder of other
  runs) is not offered as one."""
  from train.study import report  # noqa: PLC0415

  main = {"latency": latency.main, "report": report.main}[tool]
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text("{}")
  (run / "eval.json").write_text("{}")
  before = _snapshot(tmp_path)
  line = _one_error(main([str(run)]), capsys.readouterr().err)
  assert f"{run} is a single run, not a sweep root" in line and f"--workdir {run}" in line, line
  assert str(tmp_path) not in line.replace(str(run), ""), line
  assert _snapshot(tmp_path) == before
  (tmp_path / "sweep.json").write_text("{}")
  before = _snapshot(tmp_path)
  line = _one_error(main([str(run)]), capsys.readouterr().err)
  assert f"{run} is a cell of the sweep root {tmp_path}: give the root" in line, line
  assert _snapshot(tmp_path) == before


RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"


def test_latency_of_committed_results_names_init(capsys):
  """The committed roots keep no checkpoints; latency does not depend on the weights, so ``--init`` is the fix."""
  line = _one_error(latency.main([str(RESULTS / "small")]), capsys.readouterr().err)
  assert "keeps no checkpoint for dense-s0" in line and "add --init" in line, line


@pytest.mark.parametrize("given, named", [("starved/dense-s0", "is a cell of the sweep root"),
                                          ("recall", "holds sweep roots (L2, ")])
def test_report_given_a_cell_or_a_folder_of_roots_names_the_root(given, named, capsys):
  from train.study import report  # noqa: PLC0415

  before = _snapshot(RESULTS)
  line = _one_error(report.main([str(RESULTS / given)]), capsys.readouterr().err)
  assert named in line, line
  assert _snapshot(RESULTS) == before


def test_fibjax_advice_fits_the_window_given():
  """A window below 1 is not fixed by a smaller --window or a larger --seq-len."""
  from fibjax.__main__ import check_args  # noqa: PLC0415

  with pytest.raises(ValueError, match=r"^--window must be an int >= 1, got -3$"):
    check_args(1024, -3)
  with pytest.raises(ValueError, match=r"below --seq-len \(64\), got 64; give a smaller --window or a larger"):
    check_args(64, 64)
