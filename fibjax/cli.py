"""The argument parser every fibjax command line uses: a bad argument is one line on stderr,
``error: <what is wrong> (--help lists the arguments)``, and exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose usage errors are one line (argparse prints the usage block
  first); ``--help`` is unchanged."""

  def error(self, message: str) -> NoReturn:
    print(f"error: {message} (--help lists the arguments)", file=sys.stderr)
    sys.exit(2)
