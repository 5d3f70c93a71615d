"""``python -m train.compare``: the command of ``train.study.compare`` (its docstring has the usage)."""

from train.cli import exit_with
from train.study.compare import main

if __name__ == "__main__":
  exit_with(main())
