"""``python -m train.passkey``: the command of ``train.probe.passkey`` (its docstring has the usage)."""

from train.cli import exit_with
from train.probe.passkey import main

if __name__ == "__main__":
  exit_with(main())
