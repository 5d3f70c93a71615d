"""``python -m train.generate``: the command of ``train.probe.generate`` (its docstring has the usage)."""
import sys

from train.probe.generate import main

if __name__ == "__main__":
  sys.exit(main())
