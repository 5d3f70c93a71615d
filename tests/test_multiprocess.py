"""``python -m train`` as a job of several processes on one CPU machine (``jax.distributed`` with a
coordinator on localhost, Gloo collectives; train/README.md, "Several processes"). Every run spans
the same 4 simulated CPU devices: one process of 4, or 2 processes of 2 each. Checked: the loss
curve of 2 processes is the one of a single process (same seed, global batch and mesh); a
checkpoint saved by 2 processes resumes in 1 and one saved by 1 resumes in 2, each continuing the
uninterrupted run's curve; and process 0 alone writes the run's files (every process writes its
shards of a checkpoint through Orbax).

The runs are launched once for the module (``runs``), the independent ones side by side.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import portpicker
import pytest

from train.run.mesh import process_settings, wait_for_coordinator
from train.run.workdir import workdir_lock

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 4  # in every run, over the processes of its job
SEED = 7
STEPS, HALF = 6, 3  # a full run, and where a run stops to be resumed
SETTINGS = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.head_dim=16", "model.mlp_dim=64",
            "model.seq_len=64", "model.window=8", "batch_size=8", f"seed={SEED}", "mesh_fsdp=4", "log_every=1",
            "eval_every=1000", f"checkpoint_every={HALF}", "final_eval_multiples=1", "final_eval_tokens=512",
            "eval_batches=1", "progress=false", "warmup_steps=30"]
# mesh_fsdp=4: the parameters are sharded across the processes. warmup_steps > STEPS: the learning
# rate schedule spans max(steps, warmup_steps + 1) steps (train.run.step.make_optimizer), the same
# for steps = HALF and STEPS, so a run stopped at HALF and resumed to STEPS follows the schedule of
# one trained to STEPS at once.
STAGE_TIMEOUT_S = 300  # a job whose processes stop meeting in their collectives fails here, not in CI's timeout
RTOL = 1e-6  # Gloo and XLA's in-process all-reduce may sum the devices' gradients in another order

# Installed (through PYTHONPATH) in the processes of a 2-process job: appends every path a process
# opens for writing, creates, renames or removes through Python to the file FIBJAX_TEST_WRITES names.
WRITE_AUDIT = textwrap.dedent("""\
    import os, sys, threading

    _path = os.environ.get("FIBJAX_TEST_WRITES")
    if _path:
      _out, _lock = open(_path, "a", buffering=1), threading.Lock()
      _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
      _FIRST = {"os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree"}  # the path is args[0]

      def _audit(event, args):
        if event == "open":
          path, mode, flags = args
          written = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
        elif event in ("os.rename", "os.replace"):
          path, written = args[1], True
        elif event in _FIRST:
          path, written = args[0], True
        else:
          return
        if written and isinstance(path, (str, bytes, os.PathLike)):
          with _lock:
            _out.write(os.path.abspath(os.fsdecode(path)) + "\\n")

      sys.addaudithook(_audit)
    """)


@dataclasses.dataclass
class Job:
  """One ``python -m train`` command run as ``len(procs)`` processes; ``logs`` holds each one's
  stdout and stderr, ``writes`` (audited jobs) the paths each wrote."""

  name: str
  workdir: pathlib.Path
  command: list[str]
  procs: list[subprocess.Popen]
  logs: list[pathlib.Path]
  writes: list[pathlib.Path]

  def describe(self) -> str:
    """The command, each process's exit status and the end of its output, for a failure message."""
    parts = [f"job {self.name!r} ({len(self.procs)} process(es), seed {SEED}): {' '.join(self.command)}"]
    for i, (proc, log) in enumerate(zip(self.procs, self.logs)):
      tail = "\n    ".join(log.read_text(errors="replace").splitlines()[-80:])
      parts.append(f"  process {i}: exit status {proc.returncode}\n    {tail}")
    return "\n".join(parts)


def start(name: str, tmp: pathlib.Path, workdir: pathlib.Path, processes: int, steps: int) -> Job:
  """Starts ``python -m train`` (``SETTINGS``, ``steps``; a resume when ``workdir`` holds a
  checkpoint) as ``processes`` processes sharing ``DEVICES`` CPU devices; a job of several has
  its coordinator on a free localhost port and its writes audited."""
  command = [sys.executable, "-m", "train", "--workdir", str(workdir), "--set", *SETTINGS, f"steps={steps}"]
  base = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  base |= {"PYTHONFAULTHANDLER": "1",  # a process stopped for hanging (``finish``) prints where each thread waits
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES // processes}",
           "JAX_COMPILATION_CACHE_DIR": str(tmp / "compiled"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  if processes > 1:
    audit = tmp / "audit"
    audit.mkdir(exist_ok=True)
    (audit / "sitecustomize.py").write_text(WRITE_AUDIT)
    base |= {"JAX_COORDINATOR_ADDRESS": f"localhost:{portpicker.pick_unused_port()}",
             "JAX_NUM_PROCESSES": str(processes),
             "PYTHONPATH": os.pathsep.join(filter(None, [str(audit), os.environ.get("PYTHONPATH")]))}
  procs, logs, writes = [], [], []
  for i in range(processes):
    log, written = tmp / f"{name}.{i}.log", tmp / f"{name}.{i}.writes"
    env = base | ({"JAX_PROCESS_ID": str(i), "FIBJAX_TEST_WRITES": str(written)} if processes > 1 else {})
    with log.open("w") as out:
      procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    logs.append(log)
    writes.append(written)
  return Job(name, workdir, command, procs, logs, writes)


def finish(jobs: list[Job], status: int = 0, timeout_s: float = STAGE_TIMEOUT_S) -> None:
  """Waits for every process of ``jobs``; fails the test (naming the job, its seed and each
  process's output) when one exits with another status than ``status`` or the stage outlasts
  ``timeout_s``, after killing what still runs (a process whose peer died would wait in a
  collective); a stage stopped otherwise (Ctrl-C) leaves no process behind either."""
  deadline = time.monotonic() + timeout_s
  try:
    for job in jobs:
      for proc in job.procs:
        proc.wait(timeout=max(deadline - time.monotonic(), 0))
        if proc.returncode != status:
          kill(jobs)
          pytest.fail(f"a process exited with {proc.returncode}, not {status}:\n{job.describe()}", pytrace=False)
  except subprocess.TimeoutExpired:
    kill(jobs, signal.SIGABRT)  # the hung processes' stacks reach their logs, which the failure shows
    pytest.fail(f"timed out after {timeout_s} s:\n" + "\n".join(j.describe() for j in jobs), pytrace=False)
  finally:
    kill(jobs)


def kill(jobs: list[Job], first: signal.Signals | None = None) -> None:
  """Kills (and reaps) the processes of ``jobs`` still running; with ``first`` (``SIGABRT``: Python's
  fault handler then prints every thread's stack), sends it and waits up to 10 s before killing."""
  running = [p for job in jobs for p in job.procs if p.poll() is None]
  for proc in running if first is not None else []:
    proc.send_signal(first)
  for proc in running:
    try:
      proc.wait(timeout=10 if first is not None else 0)
    except subprocess.TimeoutExpired:
      pass
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Job]:
  """``one``: a single process, ``STEPS`` steps. ``two``: 2 processes, ``HALF`` steps, then
  ``two_then_one``: its workdir resumed by a single process to ``STEPS``. ``half``: a single
  process, ``HALF`` steps, then ``one_then_two``: its workdir resumed by 2 processes.

  The runs share JAX's compilation cache: the first stage compiles the single-process and the
  2-process programs, the later ones load them (which halves the time on 2 cores)."""
  tmp = tmp_path_factory.mktemp("multiprocess")
  # a resume continues in the workdir of the run it resumes: "two"'s metrics then hold steps
  # 1..HALF of the 2 processes and the steps after them of the single one
  stages = [[("one", "one", 1, STEPS), ("two", "two", 2, HALF)],
            [("half", "half", 1, HALF), ("two_then_one", "two", 1, STEPS)],
            [("one_then_two", "half", 2, STEPS)]]
  jobs = {}
  for stage in stages:
    started = [start(name, tmp, tmp / folder, processes, steps) for name, folder, processes, steps in stage]
    finish(started)
    jobs |= {job.name: job for job in started}
  return jobs


def records(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir: pathlib.Path) -> dict[int, float]:
  """The training loss of each logged step; a step logged twice fails the test."""
  steps = [r["step"] for r in records(workdir) if "loss" in r]
  assert len(steps) == len(set(steps)), f"a step is logged more than once in {workdir}: {steps}"
  return {r["step"]: r["loss"] for r in records(workdir) if "loss" in r}


def curve(workdir: pathlib.Path, first: int, last: int) -> np.ndarray:
  found = losses(workdir)
  assert set(range(first, last + 1)) <= found.keys(), f"steps {first}..{last} not all logged in {workdir}: {found}"
  return np.array([found[s] for s in range(first, last + 1)])


def test_two_processes_train_the_single_process_curve(runs):
  reference = curve(runs["one"].workdir, 1, STEPS)
  np.testing.assert_allclose(curve(runs["two"].workdir, 1, HALF), reference[:HALF], rtol=RTOL,
                             err_msg=f"seed {SEED}: 2 processes vs 1, steps 1..{HALF}")
  start_event = next(r for r in records(runs["two"].workdir) if r.get("event") == "start")
  assert start_event["devices"] == DEVICES and start_event["mesh"] == {"data": 1, "fsdp": DEVICES}


@pytest.mark.parametrize("name, saved_by, resumed_by", [("two_then_one", 2, 1), ("one_then_two", 1, 2)])
def test_a_checkpoint_resumes_on_another_process_count(runs, name, saved_by, resumed_by):
  """The checkpoint of step HALF, saved by ``saved_by`` processes, resumed by ``resumed_by``: the
  steps after it and the final evaluation are the uninterrupted single-process run's."""
  workdir, reference = runs[name].workdir, runs["one"].workdir
  what = f"seed {SEED}: resumed by {resumed_by} process(es) from the checkpoint of {saved_by} vs uninterrupted"
  assert [r["step"] for r in records(workdir) if r.get("event") == "resume"] == [HALF], what
  np.testing.assert_allclose(curve(workdir, HALF + 1, STEPS), curve(reference, HALF + 1, STEPS), rtol=RTOL,
                             err_msg=what)
  final, expected = (json.loads((w / "eval.json").read_text())["1x"]["loss"] for w in (workdir, reference))
  np.testing.assert_allclose(final, expected, rtol=RTOL, err_msg=what)


@pytest.mark.parametrize("name", ["two", "one_then_two"])
def test_only_process_zero_writes_the_run_files(runs, name):
  """Process 0 writes the config, metrics, TensorBoard events and evaluations; process 1 writes
  only inside ``checkpoints/`` (its shards, through Orbax, and its save probe)."""
  job = runs[name]
  workdir = job.workdir.resolve()

  def written(i: int) -> set[pathlib.Path]:
    paths = {pathlib.Path(line) for line in job.writes[i].read_text().splitlines()} if job.writes[i].exists() else set()
    # the workdir itself is left out: process 0 creates it (or finds it, which the audit also records)
    return {p.relative_to(workdir) for p in paths if p.is_relative_to(workdir) and p != workdir}

  lead, other = written(0), written(1)
  assert {pathlib.Path("metrics.jsonl"), pathlib.Path("eval.json")} <= lead, f"process 0's writes: {sorted(lead)}"
  assert {"tb", "checkpoints"} <= {p.parts[0] for p in lead}, f"process 0's writes: {sorted(lead)}"
  outside = sorted(str(p) for p in other if p.parts[0] != "checkpoints")
  assert not outside, f"process 1 wrote outside checkpoints/: {outside}"
  assert any(p.parts[0] == "checkpoints" for p in other), "process 1 wrote no checkpoint files (is the audit on?)"


def test_a_start_refused_on_one_process_stops_them_all(tmp_path):
  """Process 0 alone checks the workdir's lock; held elsewhere, both processes stop at once, each
  with one error line (process 1 would otherwise wait for process 0 in a collective)."""
  workdir = tmp_path / "busy"
  with workdir_lock(workdir):
    job = start("busy", tmp_path, workdir, 2, HALF)
    finish([job], status=2, timeout_s=120)
  lines = [[line for line in log.read_text().splitlines() if line.startswith("error: ")] for log in job.logs]
  assert lines[0] == [f"error: another process is training in {workdir}; wait for it or pick another --workdir"], \
      job.describe()
  assert lines[1] == ["error: process 0 of the job failed (its output says why); this one stops with it"], \
      job.describe()


@pytest.mark.parametrize("environ, settings", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, {}),  # JAX detects the rest from the cluster
    ({"SLURM_JOB_NUM_NODES": "4"}, {}),
    ({"SLURM_JOB_NUM_NODES": "1"}, None),
])
def test_the_environment_describes_the_job(environ, settings):
  assert process_settings(environ) == settings


@pytest.mark.parametrize("environ, message", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS not set"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID not set"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "0 <= JAX_PROCESS_ID <"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "must be integers"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "must be HOST:PORT"),
])
def test_an_incomplete_job_description_is_refused(environ, message):
  with pytest.raises(ValueError, match=message):
    process_settings(environ)


def test_a_process_waits_for_its_coordinator_and_names_it_when_none_answers():
  """A process other than 0 joins only once process 0's coordinator listens; none at the address is one
  error line (joining without one ends the process in XLA's code after five minutes, with a stack trace)."""
  with socket.socket() as listening:
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    wait_for_coordinator(f"127.0.0.1:{listening.getsockname()[1]}", 5.0)
    free = listening.getsockname()[1]
  if socket.has_ipv6:
    with socket.socket(socket.AF_INET6) as listening:  # an IPv6 host in brackets, as gRPC takes it
      listening.bind(("::1", 0))
      listening.listen()
      wait_for_coordinator(f"[::1]:{listening.getsockname()[1]}", 5.0)
  with pytest.raises(ValueError, match=rf"no coordinator answered at JAX_COORDINATOR_ADDRESS=127.0.0.1:{free} within "
                                       r"1 s: start process 0 of the job \(JAX_PROCESS_ID=0\)"):
    wait_for_coordinator(f"127.0.0.1:{free}", 1.0)
