"""``python -m train.budget``: the command of ``train.probe.budget`` (its docstring has the usage)."""

from train.cli import exit_with
from train.probe.budget import main

if __name__ == "__main__":
  exit_with(main())
