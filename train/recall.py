"""``python -m train.recall``: the command of ``train.probe.recall`` (its docstring has the usage)."""
import sys

from train.probe.recall import main

if __name__ == "__main__":
  sys.exit(main())
