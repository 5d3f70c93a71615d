"""``python -m train.sweep``: the command of ``train.study.sweep`` (its docstring has the usage)."""
import sys

from train.study.sweep import main

if __name__ == "__main__":
  sys.exit(main())
