"""``python -m train.experiment``: the command of ``train.study.experiment`` (its docstring has the usage)."""
import sys

from train.study.experiment import main

if __name__ == "__main__":
  sys.exit(main())
