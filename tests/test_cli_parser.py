"""Every command line's argument errors are one line with exit code 2 (``fibjax.cli.ArgumentParser``)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

from fibjax.cli import ArgumentParser

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_usage_error_is_one_line(capsys):
  parser = ArgumentParser(prog="python -m tool")
  parser.add_argument("--n", type=int, required=True)
  with pytest.raises(SystemExit) as e:
    parser.parse_args(["--n", "x"])
  err = capsys.readouterr().err
  assert e.value.code == 2
  assert err == "error: argument --n: invalid int value: 'x' (--help lists the arguments)\n"


def test_every_command_line_uses_the_one_line_parser():
  """No module builds a plain ``argparse.ArgumentParser`` (its errors print the usage block too),
  except the FlexAttention peer, which runs in a torch process that must not import JAX."""
  plain = []
  for top in ("train", "fibjax", "benchmarks", "configs"):
    for path in sorted((ROOT / top).rglob("*.py")):
      for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "ArgumentParser" \
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "argparse":
          plain.append(str(path.relative_to(ROOT)))
  assert plain == ["benchmarks/flex_peer.py"]


@pytest.mark.parametrize("argv", [["train.probe.evaluate", "--lengths", "x"], ["train", "--no-such-flag"],
                                  ["benchmarks.attention", "--n", "x"], ["fibjax", "--seq-len", "x"]])
def test_command_line_argument_error_is_one_line(argv):
  res = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr


def test_help_names_the_command_as_it_is_run():
  """``usage: python -m <module>``, run as a module (or as a short alias of it) or built in-process
  by that module."""
  res = subprocess.run([sys.executable, "-m", "benchmarks.norm", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0 and res.stdout.startswith("usage: python -m benchmarks.norm "), res.stdout[:200]
  res = subprocess.run([sys.executable, "-m", "fibjax", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.stdout.startswith("usage: python -m fibjax "), res.stdout[:200]
  # a short alias (train/generate.py runs train.probe.generate's main) names itself, as the README does
  res = subprocess.run([sys.executable, "-m", "train.generate", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert res.stdout.startswith("usage: python -m train.generate "), res.stdout[:200]
  assert ArgumentParser().prog == f"python -m {__name__}"
  assert ArgumentParser(prog="tool").prog == "tool"
