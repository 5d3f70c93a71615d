"""``python -m train.report``: the command of ``train.study.report`` (its docstring has the usage)."""

from train.cli import exit_with
from train.study.report import main

if __name__ == "__main__":
  exit_with(main())
