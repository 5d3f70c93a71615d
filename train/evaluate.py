"""``python -m train.evaluate``: the command of ``train.probe.evaluate`` (its docstring has the usage)."""

from train.cli import exit_with
from train.probe.evaluate import main

if __name__ == "__main__":
  exit_with(main())
