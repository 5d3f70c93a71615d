"""The trainer as a user meets it when things go wrong, in real subprocesses: damaged checkpoints,
failing saves, Ctrl-C, a single text file, a moved corpus, a prepared corpus, and one-line errors."""

import dataclasses
import json
import mmap
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs.base import TrainConfig
from tests.compile_cache import cached_env
from tests.test_train import FAST, ROOT, _cfg, _losses, _run
from train.run import checkpoint, rundir
from train.data import text as data, prepare
from train.run.restore import abstract_params, restore_params
from train.run.workdir import check_workdir

QUICK = "final_eval_multiples=1"  # one evaluation length at the end of each run: less to compile
BASE = ["steps=8", "checkpoint_every=4", "log_every=1", "eval_every=100", QUICK]


def _error_line(res: subprocess.CompletedProcess) -> str:
  """The one line a failed run prints: exit status 2, no traceback."""
  assert res.returncode == 2, res.stderr[-3000:]
  assert "Traceback" not in res.stderr, res.stderr[-3000:]
  lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, res.stderr[-3000:]
  return lines[0]


def _steps(workdir: pathlib.Path) -> list[int]:
  return checkpoint_steps(workdir / "checkpoints")


def checkpoint_steps(folder: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _assert_finite_params(workdir: pathlib.Path, step: int) -> None:
  target = abstract_params(_cfg(), jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp")))[1]
  params = restore_params(workdir / "checkpoints", step, target)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def _copy(base_run: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  """A copy of ``base_run`` (tests/conftest.py: a finished run of ``BASE``, checkpoints 4 and 8)."""
  workdir = tmp_path / "run"
  shutil.copytree(base_run, workdir)
  return workdir


def _truncate_every_array_file(step_dir: pathlib.Path) -> None:
  """Halves every array data file of a step's state: its parameters cannot be read (truncating
  only the largest file may leave them intact, when it holds optimizer state alone)."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for path in files:
    with path.open("r+b") as f:
      f.truncate(path.stat().st_size // 2)


DAMAGE = {
    "truncated array file": (_truncate_every_array_file, "cannot be read"),
    "state/_METADATA deleted": (lambda d: (d / "state" / "_METADATA").unlink(), "state/_METADATA missing"),
    "data item deleted": (lambda d: shutil.rmtree(d / "data"), "data/metadata missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_newest_intact(base_run, tmp_path, damage):
  workdir = _copy(base_run, tmp_path)
  corrupt, what = DAMAGE[damage]
  corrupt(workdir / "checkpoints" / "8")
  res = _run(workdir, QUICK, "steps=10")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "Traceback" not in res.stderr
  warning = [line for line in res.stderr.splitlines() if line.startswith("warning: checkpoint step 8")]
  assert len(warning) == 1 and what in warning[0] and "damaged" in warning[0], res.stderr[-3000:]
  assert "resuming from step 4, the newest intact checkpoint" in res.stderr
  assert _steps(workdir) == [4, 8, 10] and (workdir / rundir.DAMAGED_CHECKPOINTS / "8").is_dir()
  assert sorted(_losses(workdir)) == list(range(1, 11))  # steps 5-8 ran twice, recorded once


def test_no_intact_checkpoint_is_one_line_and_moves_nothing(base_run, tmp_path):
  workdir = _copy(base_run, tmp_path)
  for step in (4, 8):
    (workdir / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
  line = _error_line(_run(workdir, QUICK, "steps=10"))
  assert "no intact checkpoint" in line and "step 8: state/_METADATA missing" in line
  assert _steps(workdir) == [4, 8]


def test_failed_save_stops_at_once_and_keeps_earlier_checkpoints(base_run, tmp_path):
  """A full disk, as a file-size limit (EFBIG on the checkpoint's array files; the run's other
  files stay below it): the first failing save stops the run in one line naming the folder."""
  workdir = _copy(base_run, tmp_path)
  limit = 100_000
  assert max(p.stat().st_size for p in (workdir / "checkpoints" / "8").rglob("*") if p.is_file()) > limit

  train = f"{sys.executable} -m train --workdir {workdir} --set steps=40 checkpoint_every=4"
  start = time.monotonic()
  res = subprocess.run(["bash", "-c", f"ulimit -f {limit // 1024} && exec {train}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=240)
  assert time.monotonic() - start < 120
  line = _error_line(res)
  assert f"saving checkpoint step 12 into {workdir / 'checkpoints'} failed" in line and "kept" in line
  assert _steps(workdir) == [4, 8]
  _assert_finite_params(workdir, 8)
  assert max(_losses(workdir)) < 20  # stopped within a few steps of the failed save


def test_unwritable_checkpoint_folder_fails_before_saving(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(checkpoint.CheckpointError, match=f"cannot write checkpoints into {blocker / 'checkpoints'}"):
    checkpoint.ensure_writable(blocker / "checkpoints")


def test_ctrl_c_stops_in_one_line_and_keeps_the_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "train", "--workdir", str(workdir), "--set", *FAST, "steps=100000",
         "checkpoint_every=4", "log_every=1"]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not (workdir / "checkpoints" / "4").exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: interrupted at step") and "is kept" in lines[0], stderr
  assert lines[0].endswith(f"Resume with: python -m train --workdir {workdir}"), lines[0]
  saved = _steps(workdir)
  assert saved and saved[0] >= 4
  _assert_finite_params(workdir, saved[-1])
  losses = _losses(workdir)  # strict JSON, each step once
  assert losses and max(losses) < 100000


def test_single_text_file_trains_from_any_folder_and_corpus_can_move(tmp_path):
  """One .txt (one document): its last eighth is held out. The path is stored absolute, so the
  run resumes from another folder; a moved copy of the same content is accepted; generation
  needs no corpus."""
  text = data.load_documents()[5]["text"][:60_000].encode("ascii", "ignore").decode()
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "book.txt").write_text(text)
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "train", "--workdir", str(workdir), "--data", "book.txt", "--set", *FAST, "steps=2",
         "checkpoint_every=2", QUICK]
  env = cached_env({**os.environ, "PYTHONPATH": str(ROOT)})
  first = subprocess.run(cmd, cwd=tmp_path / "corpus", capture_output=True, text=True, timeout=300, env=env)
  assert first.returncode == 0, first.stderr[-3000:]
  source = json.loads((workdir / rundir.DATA_SOURCE).read_text())
  assert source["path"] == str(tmp_path / "corpus" / "book.txt")
  heldout = np.load(workdir / "heldout_tokens.npy")
  assert len(heldout) == 1 + len(text.encode()) // data.HELDOUT_TAIL  # separator + the last eighth (ASCII text)
  shutil.move(tmp_path / "corpus", tmp_path / "moved")
  line = _error_line(_run(workdir, QUICK, "steps=3"))
  assert "is gone" in line and "--data" in line
  gen = subprocess.run([sys.executable, "-m", "train.probe.generate", "--workdir", str(workdir), "--prompt", "The",
                        "--max-new-tokens", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=cached_env())
  assert gen.returncode == 0, gen.stderr[-3000:]
  moved = _run(workdir, QUICK, "steps=3", extra=["--data", str(tmp_path / "moved" / "book.txt")])
  assert moved.returncode == 0, moved.stderr[-3000:]
  (tmp_path / "other.txt").write_text(text[::-1])
  line = _error_line(_run(workdir, QUICK, "steps=4", extra=["--data", str(tmp_path / "other.txt")]))
  assert "incompatible" in line and "data" in line
  assert "a renamed copy is other data" in line and "(book.txt)" in line  # names count, as a renamed copy finds
  saved = TrainConfig.load(workdir / rundir.CONFIG)  # the same name, other bytes: the name is not the fix
  same_name = dataclasses.replace(saved, data_path=str(tmp_path / "elsewhere" / "book.txt"))
  with pytest.raises(ValueError, match="book.txt here has other bytes than the file the run trained on"):
    check_workdir(workdir, same_name, data_hash="0" * 64)


def test_failed_starts_leave_the_workdir_as_it_was(base_run, tmp_path):
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "short.txt").write_text("too short for a window of 65 tokens")
  for name, message in (("empty.txt", "is empty"), ("short.txt", "fewer than one window")):
    line = _error_line(_run(tmp_path / "new", QUICK, extra=["--data", str(tmp_path / name)]))
    assert message in line
    assert not (tmp_path / "new").exists()
  workdir = _copy(base_run, tmp_path)
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  for overrides, field in ((["lr=-1"], "lr"), (["model.seq_len=1"], "model.seq_len")):
    assert field in _error_line(_run(workdir, QUICK, *overrides))
  assert "is a file" in _error_line(_run(workdir / "config.json", QUICK))
  assert before == {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}


def test_prepared_corpus_matches_in_memory_tokens_and_trains(tmp_path):
  """``train.data.prepare`` streams a corpus into token files equal to the in-memory pipeline's (a
  .jsonl of documents; one .txt split inside itself); training memory-maps them."""
  docs = [{"id": d["id"], "text": d["text"][:40_000]} for d in data.load_documents()[:8]]
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  (tmp_path / "one.txt").write_text(docs[0]["text"][:50_000])
  for name in ("docs.jsonl", "one.txt"):
    prepare.prepare(tmp_path / name, tmp_path / f"prep-{name}")
    train_tokens, heldout_tokens, manifest = data.open_prepared(tmp_path / f"prep-{name}")
    assert isinstance(train_tokens.base.obj, mmap.mmap) and manifest["dtype"] == "uint8"  # mapped, not read
    want = [data.tokenize(d, data.ByteTokenizer()) for d in data.split_documents(data.load_documents(tmp_path / name))]
    np.testing.assert_array_equal(train_tokens, want[0])
    np.testing.assert_array_equal(heldout_tokens, want[1])
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="is empty"):
    prepare.prepare(tmp_path / "empty.txt", tmp_path / "prep-empty")
  assert not (tmp_path / "prep-empty").exists() and not (tmp_path / "prep-empty.partial").exists()
  cli = [sys.executable, "-m", "train.data.prepare", "--data", str(tmp_path / "docs.jsonl"), "--out"]
  again = subprocess.run([*cli, str(tmp_path / "prep-docs.jsonl")], cwd=ROOT, capture_output=True, text=True)
  assert "already exists" in _error_line(again)
  prepared = tmp_path / "prep-docs.jsonl"
  res = _run(tmp_path / "run", QUICK, "steps=2", extra=["--data", str(prepared)])
  assert res.returncode == 0, res.stderr[-3000:]
  np.testing.assert_array_equal(np.load(tmp_path / "run" / "heldout_tokens.npy"), data.open_prepared(prepared)[1])
  source = json.loads((tmp_path / "run" / rundir.DATA_SOURCE).read_text())
  assert source["sha256"] == data.read_manifest(prepared)["tokens_sha256"]
  bpe = subprocess.run([*cli, str(tmp_path / "bpe"), "--tokenizer", "bpe", "--bpe-vocab-size", "300"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert bpe.returncode == 0, bpe.stderr[-3000:]
  assert data.read_manifest(tmp_path / "bpe")["dtype"] == "uint16" and (tmp_path / "bpe" / "tokenizer.json").exists()
  line = _error_line(_run(tmp_path / "run-bpe", QUICK, "steps=2", extra=["--data", str(tmp_path / "bpe")]))
  assert "tokenizer=bpe bpe_vocab_size=300 model.vocab_size=300" in line
  hint = bpe.stdout.strip().splitlines()[-1].split("train with python -m train ")[1].split()  # the command it prints
  assert hint[:2] == ["--data", str(tmp_path / "bpe")] and hint[2] == "--set"
  res = _run(tmp_path / "run-bpe", QUICK, "steps=2", *hint[3:], extra=hint[:2])
  assert res.returncode == 0, res.stderr[-3000:]
