"""``python -m train.report``: the command of ``train.study.report`` (its docstring has the usage)."""
import sys

from train.study.report import main

if __name__ == "__main__":
  sys.exit(main())
