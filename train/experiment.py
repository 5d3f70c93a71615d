"""``python -m train.experiment``: the command of ``train.study.experiment`` (its docstring has the usage)."""

from train.cli import exit_with
from train.study.experiment import main

if __name__ == "__main__":
  exit_with(main())
