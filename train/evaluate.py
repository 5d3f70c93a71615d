"""``python -m train.evaluate``: the command of ``train.probe.evaluate`` (its docstring has the usage)."""
import sys

from train.probe.evaluate import main

if __name__ == "__main__":
  sys.exit(main())
