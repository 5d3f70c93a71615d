"""``python -m train.latency``: the command of ``train.study.latency`` (its docstring has the usage)."""
import sys

from train.study.latency import main

if __name__ == "__main__":
  sys.exit(main())
