"""``python -m train.prepare``: the command of ``train.data.prepare`` (its docstring has the usage)."""

from train.cli import exit_with
from train.data.prepare import main

if __name__ == "__main__":
  exit_with(main())
