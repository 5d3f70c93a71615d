"""Same-run A/B between this checkout and a base revision, on one GPU, base and head alternating.

    python -m benchmarks.ab BASE_TREE [--rounds 2] [--out DIR] -- -m benchmarks.decode --contexts 65536 --batches 1
    python -m benchmarks.ab BASE_TREE --kernel [--n 16384 65536]
    python -m benchmarks.ab BASE_TREE --jaxprs

``BASE_TREE`` is a checkout of the base revision (``git worktree add DIR REV``, or ``git archive
REV | tar -x -C DIR``). With a command after ``--``, it runs ``python COMMAND --out DIR/<side>_r<k>``
in each tree (working directory and ``PYTHONPATH`` set to the tree), base then head, ``--rounds``
times, and compares every numeric leaf of the JSON files each run wrote whose key names a time
(``ms`` or ``per_s``). With ``--kernel`` the command is this file's own kernel timer (``fibjax.attention``
with the Pallas kernel, static and learned offsets, forward and forward + backward, bf16, batch 1,
8 heads of 64; the same call, loss and timer in both trees: this checkout's ``benchmarks.attention`` and
``benchmarks.timing``). Prints, per measurement, the median over rounds of
each side, head / base, and the spread of each side over rounds (differences smaller than that
are noise), and writes ``ab.json`` under ``--out`` after every round. ``--resume`` continues a run in
the same ``--out`` with the same command and code: finished runs are kept, not repeated, and a run
cut off midway is kept aside (``<side>_r<k>.partial``) and run again. With ``--jaxprs`` (no GPU needed) it compares
the attention kernels' ``pallas_call`` bodies and launch parameters (warps, stages) of both trees at
training and long shapes instead.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import itertools
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import types
from typing import Callable, NoReturn

from fibjax.cli import ArgumentParser

HEAD = pathlib.Path(__file__).resolve().parents[1]


def kernel_worker(ns: list[int], out: pathlib.Path, reps: int) -> None:
  """Times the kernel through the public API of whichever ``fibjax`` is on the path, with this
  checkout's ``benchmarks.attention`` calls (``variants``: static and learned offsets, the kernel's
  default options) and loss (``fwd_bwd``) in both trees, on random bf16 ``q, k, v [B, n, H, D]``."""
  import jax  # noqa: PLC0415  (the worker imports the tree it runs in)
  import jax.numpy as jnp  # noqa: PLC0415

  attention = _head_module("attention")  # one benchmark for both trees (their own fibjax)
  time_fn = _head_module("timing").time_fn  # one timer for both trees

  fs, _ = attention.variants(None, None, with_xla=False)
  res = {}
  for n in ns:
    keys = jax.random.split(jax.random.key(n), 4)
    sets = [tuple(jax.random.normal(k, (3, attention.B, n, attention.H, attention.D), jnp.bfloat16)) for k in keys]
    for name in ("static", "learned"):
      f = fs[f"fib {name}"]
      res[f"{name}_n{n}_fwd_ms"] = time_fn(jax.jit(f), sets, reps=reps)
      res[f"{name}_n{n}_fwd_bwd_ms"] = time_fn(attention.fwd_bwd(f), sets, reps=reps)
      print(name, n, res[f"{name}_n{n}_fwd_ms"], res[f"{name}_n{n}_fwd_bwd_ms"], flush=True)
  out.mkdir(parents=True, exist_ok=True)
  (out / "kernel.json").write_text(json.dumps(res, indent=2) + "\n")


def _is_measurement(key: object) -> bool:
  return "ms" in str(key).split("_") or str(key).endswith("per_s")


def _label(i: int, item: object) -> str:
  """A list item's name: its identifying fields (strings and integers that are not measurements)."""
  if not isinstance(item, dict):
    return str(i)
  names = [f"{k}={v}" for k, v in item.items()
           if isinstance(v, (str, int)) and not isinstance(v, bool) and not _is_measurement(k)]
  return ",".join(names) or str(i)


def _head_module(name: str) -> types.ModuleType:
  """``benchmarks.<name>`` of this checkout, whichever tree is on the path."""
  spec = importlib.util.spec_from_file_location(f"head_{name}", HEAD / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def jaxpr_worker(out: pathlib.Path) -> None:
  """Hashes of the kernels' ``pallas_call`` bodies with their launch parameters (forward, dQ,
  dK/dV; lowered for a CUDA target on any machine, default configuration) at training and long
  shapes (bf16 ``q [1, n, 8, d]``, ``k, v [1, n, kv_heads, d]``; ``benchmarks.attention``'s window,
  reach and offsets), through whichever ``pallas_kernels`` is on the path. Equal hashes: the two
  trees run the same kernel computation on the same warps and pipeline stages."""
  import hashlib  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from pallas_kernels import gathered_offset_attention  # noqa: PLC0415

  attention = _head_module("attention")  # the benchmark's window, reach and static offsets
  static = jnp.asarray(attention.static_offsets(), jnp.int32)
  res = {}
  jax.default_backend = lambda: "gpu"  # lowering only: nothing runs
  for n, d, kv_heads, learned in itertools.product((1024, 8192, 65536), (64, 128), (8, 2), (False, True)):
    offsets = static.astype(jnp.float32) * 1.001 if learned else static
    q, kv = (jax.ShapeDtypeStruct((1, n, h, d), jnp.bfloat16) for h in (8, kv_heads))

    def loss(q: jax.Array, k: jax.Array, v: jax.Array, offsets: jax.Array = offsets) -> jax.Array:
      out = gathered_offset_attention(q, k, v, window=attention.W, offsets=offsets, reach=attention.R, backend="gpu")
      return jnp.sum(out.astype(jnp.float32))

    name = f"n{n}_d{d}_kv{kv_heads}_{'learned' if learned else 'static'}"
    try:
      jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, kv, kv)
    except Exception as e:  # noqa: BLE001  (a shape the tree does not support is reported)
      res[name] = f"error: {str(e).splitlines()[0][:120]}"
      continue
    bodies = []

    def walk(j: jax.extend.core.Jaxpr) -> None:
      for eqn in j.eqns:
        if eqn.primitive.name == "pallas_call":
          kernel = f"{eqn.params['jaxpr']}\n{eqn.params['compiler_params']}"
          bodies.append(hashlib.sha1(kernel.encode()).hexdigest()[:12])
        for v in eqn.params.values():
          inner = getattr(v, "jaxpr", v)
          if hasattr(inner, "eqns"):
            walk(inner)

    walk(jaxpr.jaxpr)
    res[name] = bodies
  out.mkdir(parents=True, exist_ok=True)
  (out / "jaxprs.json").write_text(json.dumps(res, indent=2) + "\n")


def leaves(tree: dict | list, prefix: str = "") -> dict[str, float]:
  """Numeric leaves of a JSON tree whose key names a time (``ms`` or ``per_s``), by path; list
  items are named by their identifying fields, so reordered rows still match."""
  items = tree.items() if isinstance(tree, dict) else ((_label(i, x), x) for i, x in enumerate(tree))
  out = {}
  for key, value in items:
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, (dict, list)):
      out.update(leaves(value, path))
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and _is_measurement(key):
      out[path] = float(value)
  return out


DONE = ".done"  # written into a run's folder once its command has exited cleanly
RUN_DIR = re.compile(r"(base|head)_r(\d+)")
CODE = ("fibjax", "pallas_kernels", "configs", "train", "benchmarks")


def tree_digest(tree: pathlib.Path) -> str:
  """A hash of a tree's Python code (and ``pyproject.toml``): a resumed A/B must time the same code."""
  h = hashlib.sha1()
  files = [p for top in CODE for p in (tree / top).rglob("*.py")] + [tree / "pyproject.toml"]
  for path in sorted(p for p in files if p.is_file() and "__pycache__" not in p.parts):
    h.update(str(path.relative_to(tree)).encode() + b"\0" + path.read_bytes() + b"\0")
  return h.hexdigest()[:16]


def _finished(args: argparse.Namespace, plan: dict, fail: Callable[[str], NoReturn]) -> tuple[int, list[pathlib.Path]]:
  """Checks ``--out`` against ``--resume``, writing nothing: the rounds already finished there, and
  the run folders left unfinished (cut off mid-run). A resumed run must have the same plan
  (command, base and both trees' code)."""
  started = sorted(p for p in args.out.iterdir() if RUN_DIR.fullmatch(p.name) and any(p.iterdir())) \
      if args.out.is_dir() else []
  if started and not args.resume:
    fail(f"{args.out} already holds runs ({started[0].name}); give an empty or new --out, or --resume to continue them")
  finished = 0
  if started:
    manifest = args.out / "plan.json"
    try:
      same = json.loads(manifest.read_text()) == plan
    except (OSError, ValueError):
      same = False
    if not same:
      fail(f"--resume: {args.out} holds runs of another command, base or code ({manifest} differs, is missing or "
           f"unreadable); give a new --out")
    done = {p.name for p in started if (p / DONE).is_file()}
    while {f"base_r{finished}", f"head_r{finished}"} <= done:
      finished += 1
    if args.rounds < finished:
      fail(f"--resume: {args.out} already holds {finished} finished rounds; give --rounds {finished} or more")
  return finished, [p for p in started if not (p / DONE).is_file()]


def _prepare_out(args: argparse.Namespace, plan: dict, unfinished: list[pathlib.Path]) -> None:
  """Keeps each unfinished run folder aside as ``<name>.partial[-i]`` (it runs again) and writes the plan."""
  for p in unfinished:
    names = (p.name + ".partial" + (f"-{i}" if i else "") for i in itertools.count())
    aside = next(q for q in map(p.with_name, names) if not q.exists())
    p.rename(aside)
    print(f"[ab] unfinished {p.name} kept aside as {aside.name}; it runs again", file=sys.stderr)
  (args.out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")


def _portable(arg: str) -> str:
  """A command argument with this checkout's path made relative (the plan of a run survives a move)."""
  return arg.replace(str(HEAD) + os.sep, "")


def collect(folder: pathlib.Path) -> dict[str, float]:
  """``leaves`` of every JSON file under ``folder``, each named ``<file stem>:<path>``."""
  out = {}
  for path in sorted(folder.rglob("*.json")):
    out.update({f"{path.stem}:{k}": v for k, v in leaves(json.loads(path.read_text())).items()})
  return out


def compare(runs: dict[str, list[dict[str, float]]]) -> tuple[list[dict], list[str]]:
  """Rows for the measurements every run has, and the names of those only some runs have."""
  keys = [set(r) for side in runs.values() for r in side]
  common = set.intersection(*keys)
  rows = []
  for key in sorted(common):
    row = {"measurement": key}
    for side, side_runs in runs.items():
      values = [r[key] for r in side_runs]
      row[side] = statistics.median(values)
      row[f"{side}_spread"] = (max(values) - min(values)) / row[side] if row[side] else 0.0
    row["head_over_base"] = row["head"] / row["base"] if row["base"] else float("nan")
    rows.append(row)
  return rows, sorted(set.union(*keys) - common)


def compare_jaxprs(base: dict, head: dict) -> None:
  print("| shape | forward | dQ | dK/dV |\n|---|---|---|---|")
  for name in head:
    a, b = base.get(name), head[name]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) == 3:
      print(f"| {name} | " + " | ".join("same" if x == y else "differs" for x, y in zip(a, b)) + " |")
    else:
      print(f"| {name} | base: {a if isinstance(a, str) else 'ok'}; head: {b if isinstance(b, str) else 'ok'} | | |")


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  command = argv[argv.index("--") + 1:] if "--" in argv else []
  parser = ArgumentParser(description=__doc__)
  parser.add_argument("base_tree", type=pathlib.Path, nargs="?")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("ab_results"))
  parser.add_argument("--resume", action="store_true",
                      help="keep the finished runs in --out (same command) and run only the missing ones")
  parser.add_argument("--kernel", action="store_true", help="time the attention kernel (same call in both trees)")
  parser.add_argument("--n", type=int, nargs="+", default=[16384, 65536])
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--jaxprs", action="store_true",
                      help="compare the kernels' pallas_call bodies (no GPU needed) instead of timing")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--worker-jaxprs", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
  if args.worker:
    return kernel_worker(args.n, args.out, args.reps)
  if args.worker_jaxprs:
    return jaxpr_worker(args.out)
  # here, not above: the workers run in trees whose benchmarks.cli may lack these
  from benchmarks.cli import at_least, fail, out_folder, require_gpu  # noqa: PLC0415

  if args.base_tree is None or not (args.base_tree / "fibjax").is_dir():
    fail(f"BASE_TREE must be a checkout of the base revision (holding fibjax/), got {args.base_tree}")
  if bool(command) + args.kernel + args.jaxprs != 1:
    fail("give one of --kernel, --jaxprs or a command after --")
  if args.rounds < 1:
    fail(f"--rounds must be at least 1, got {args.rounds}")
  # checked after parsing, not by the parser's types: the workers, in trees without at_least, parse these too
  for flag, values, what in (("--n", args.n, "sequence lengths"), ("--reps", [args.reps], "")):
    for value in values:
      at_least(1, flag, what)(str(value))
  if args.kernel:
    command = [str(pathlib.Path(__file__).resolve()), "--worker", "--n", *map(str, args.n), "--reps", str(args.reps)]
  if args.jaxprs:
    command, args.rounds = [str(pathlib.Path(__file__).resolve()), "--worker-jaxprs"], 1
  trees = {"base": args.base_tree.resolve(), "head": HEAD}
  plan = {"command": [_portable(c) for c in command], "base_tree": _portable(str(trees["base"])),
          "code": {side: tree_digest(tree) for side, tree in trees.items()}}
  out_folder(args.out)
  finished, unfinished = _finished(args, plan, fail)
  if args.kernel:
    require_gpu("benchmarks.ab --kernel times GPU kernels")
  _prepare_out(args, plan, unfinished)
  runs: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
  for k in range(args.rounds):
    ran = False
    for side, tree in trees.items():
      out = (args.out / f"{side}_r{k}").resolve()
      if (out / DONE).is_file():
        print(f"[ab] {side} round {k}: kept from {out}", flush=True)
      else:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
        print(f"[ab] {side} round {k}: python {' '.join(command)}", flush=True)
        code = subprocess.run([sys.executable, *command, "--out", str(out)], cwd=tree, env=env).returncode
        if code or not (out.is_dir() and any(out.rglob("*.json"))):
          kept = (f"{args.out / 'ab.json'} holds the {k} rounds before it; --resume runs the rest" if k else
                  f"no round finished, so {args.out / 'ab.json'} was not written; fix the command and run it again")
          print(f"error: {side} round {k} {f'exited with {code}' if code else f'wrote no JSON under {out}'}; "
                f"{kept}", file=sys.stderr)
          sys.exit(1)
        (out / DONE).write_text("")
        ran = True
      runs[side].append(collect(out))
    if not args.jaxprs and (ran or k + 1 >= max(finished, args.rounds)):
      rows, unmatched = compare(runs)
      (args.out / "ab.json").write_text(json.dumps({**plan, "rounds": k + 1, "rows": rows, "unmatched": unmatched},
                                                   indent=2) + "\n")
  if args.jaxprs:
    return compare_jaxprs(*(json.loads((args.out / f"{side}_r0" / "jaxprs.json").read_text()) for side in trees))
  for key in unmatched:
    print(f"[ab] not in every run (left out): {key}", file=sys.stderr)
  if not rows:
    print("error: base and head share no measurement (see the lines above)", file=sys.stderr)
    sys.exit(1)
  print("| measurement | base | head | head / base | spread base / head |\n|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['measurement']} | {row['base']:.4g} | {row['head']:.4g} | {row['head_over_base']:.3f} | "
          f"{row['base_spread']:.1%} / {row['head_spread']:.1%} |")


if __name__ == "__main__":
  main()
