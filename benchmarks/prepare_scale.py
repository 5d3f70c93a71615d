"""A corpus of any size: ``python -m train.prepare`` on >= 1 GB of text (the embedded corpus
repeated, each copy's document ids made distinct) and a training start from the prepared folder.
Each command runs as its own process, timed, with its peak memory: anonymous (``RssAnon`` of
``/proc/PID/status``, sampled every 20 ms: what the process allocates) and resident (``ru_maxrss``,
which also counts the pages of memory-mapped files it has touched: page cache, reclaimable).

    python -m benchmarks.prepare_scale [--gb 1.0] [--dir /tmp/fibjax-prepare-scale] [--keep] [--out DIR] [--force]

Writes ``prepare_scale.json`` under ``--out`` (default ``benchmarks/results``; refuses to overwrite it unless ``--force``). The
corpus, the prepared folder and the runs are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

from fibjax.cli import ArgumentParser
from benchmarks.cli import add_force, at_least, claim, fail, out_folder
from train.data import text as data
from train.run import rundir

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_SET = ["steps=1", "log_every=1", "progress=false", "final_eval_multiples=1", "final_eval_tokens=2048"]
OWN = ".fibjax-prepare-scale"  # marks a --dir this benchmark made, so a rerun may delete it
MEASURE = """
import json, resource, subprocess, sys, time
start = time.time()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
peak_anon = 0
while proc.poll() is None:
  try:
    status = open(f"/proc/{proc.pid}/status").read()
    peak_anon = max(peak_anon, int(status.split("RssAnon:")[1].split()[0]))
  except (OSError, IndexError):
    pass
  time.sleep(0.02)
print(json.dumps({"rc": proc.returncode, "start": start, "wall_s": time.time() - start,
                  "peak_anon_mb": peak_anon / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def build_corpus(path: pathlib.Path, gigabytes: float) -> dict:
  """Repeats the embedded corpus into one ``.jsonl`` of at least ``gigabytes`` GB."""
  docs = data.load_documents()
  written, copies = 0, 0
  with path.open("w", encoding="utf-8") as f:
    while written < gigabytes * 1e9:
      for d in docs:
        written += f.write(json.dumps({"id": f"{d['id']}#{copies}", "text": d["text"]}) + "\n")
      copies += 1
  return {"bytes": path.stat().st_size, "copies": copies, "documents": copies * len(docs)}


def measure(cmd: list[str]) -> dict:
  """Wall time and peak memory of ``cmd`` run in a fresh process (stderr shown on failure)."""
  out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], cwd=ROOT, capture_output=True, text=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  if result["rc"]:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  return result


def train_start(data_arg: list[str], workdir: pathlib.Path) -> dict:
  """One training step: the time to the run's start record (data opened, state built and checked)
  and to its first step's record, besides the whole command's wall time and peak memory."""
  result = measure([sys.executable, "-m", "train", "--workdir", str(workdir), *data_arg, "--set", *TRAIN_SET])
  records = [json.loads(line) for line in (workdir / rundir.METRICS).read_text().splitlines()]
  result["to_start_record_s"] = records[0]["time"] - result["start"]
  result["to_first_step_s"] = next(r["time"] for r in records if r["step"] == 1) - result["start"]
  del result["start"], result["rc"]
  return result


def main(argv: list[str] | None = None) -> None:
  parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gb", type=at_least(0.001, "--gb", number=float), default=1.0)
  parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/tmp/fibjax-prepare-scale"))
  parser.add_argument("--keep", action="store_true")
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
  add_force(parser)
  args = parser.parse_args(argv)
  results = args.out / "prepare_scale.json"
  claim([results], args.force)
  if args.dir.exists() and (not args.dir.is_dir() or any(args.dir.iterdir())) and not (args.dir / OWN).exists():
    fail(f"--dir {args.dir} holds files this benchmark did not make (it deletes its folder); give a new or "
         f"empty folder")
  out_folder(args.out)
  shutil.rmtree(args.dir, ignore_errors=True)
  args.dir.mkdir(parents=True)
  (args.dir / OWN).touch()
  try:
    corpus = build_corpus(args.dir / "corpus.jsonl", args.gb)
    print(f"corpus: {corpus}", flush=True)
    prep = measure([sys.executable, "-m", "train.data.prepare", "--data", str(args.dir / "corpus.jsonl"),
                    "--out", str(args.dir / "prepared")])
    del prep["start"], prep["rc"]
    manifest = data.read_manifest(args.dir / "prepared")
    print(f"prepare: {prep}", flush=True)
    prepared = train_start(["--data", str(args.dir / "prepared")], args.dir / "run-prepared")
    print(f"train from the prepared folder: {prepared}", flush=True)
    embedded = train_start([], args.dir / "run-embedded")
    print(f"train from the embedded corpus (22.5 MB, read and tokenized in memory): {embedded}", flush=True)
  finally:
    if not args.keep:
      shutil.rmtree(args.dir, ignore_errors=True)
  result = {
      "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
      "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
      "command": "python -m benchmarks.prepare_scale", "corpus": corpus,
      "prepared_tokens": {"train": manifest["train"]["tokens"], "heldout": manifest["heldout"]["tokens"],
                          "dtype": manifest["dtype"]},
      "prepare": prep, "train_start_prepared": prepared, "train_start_embedded": embedded,
      "train_set": TRAIN_SET,
  }
  results.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {results}")


if __name__ == "__main__":
  main()
