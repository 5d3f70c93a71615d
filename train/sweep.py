"""``python -m train.sweep``: the command of ``train.study.sweep`` (its docstring has the usage)."""

from train.cli import exit_with
from train.study.sweep import main

if __name__ == "__main__":
  exit_with(main())
