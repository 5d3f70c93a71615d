"""``python -m train.recall``: the command of ``train.probe.recall`` (its docstring has the usage)."""

from train.cli import exit_with
from train.probe.recall import main

if __name__ == "__main__":
  exit_with(main())
