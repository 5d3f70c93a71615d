"""``python -m train.budget``: the command of ``train.probe.budget`` (its docstring has the usage)."""
import sys

from train.probe.budget import main

if __name__ == "__main__":
  sys.exit(main())
