"""``python -m train.generate``: the command of ``train.probe.generate`` (its docstring has the usage)."""

from train.cli import exit_with
from train.probe.generate import main

if __name__ == "__main__":
  exit_with(main())
