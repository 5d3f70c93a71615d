"""``python -m train.passkey``: the command of ``train.probe.passkey`` (its docstring has the usage)."""
import sys

from train.probe.passkey import main

if __name__ == "__main__":
  sys.exit(main())
