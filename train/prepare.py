"""``python -m train.prepare``: the command of ``train.data.prepare`` (its docstring has the usage)."""
import sys

from train.data.prepare import main

if __name__ == "__main__":
  sys.exit(main())
