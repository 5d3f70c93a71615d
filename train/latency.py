"""``python -m train.latency``: the command of ``train.study.latency`` (its docstring has the usage)."""

from train.cli import exit_with
from train.study.latency import main

if __name__ == "__main__":
  exit_with(main())
