"""The argument parser every fibjax command line uses: a bad argument is one line on stderr,
``error: <what is wrong> (--help lists the arguments)``, and exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def _module_prog(module: str) -> str | None:
  """``python -m <module>``; for ``__main__``, or a module whose ``main`` the interpreter's
  ``__main__`` module runs as its own (a short alias such as ``train.generate`` for
  ``train.probe.generate``), the module the interpreter ran (``None`` for a script or ``-c``)."""
  ran = sys.modules.get("__main__")
  runs_this = module != "__main__" and getattr(ran, "main", None) is getattr(sys.modules.get(module), "main", False)
  if module == "__main__" or runs_this:
    spec = getattr(ran, "__spec__", None)
    if spec is None:
      return None if module == "__main__" else f"python -m {module}"
    module = spec.name
  return f"python -m {module.removesuffix('.__main__')}"


class ArgumentParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose usage errors are one line (argparse prints the usage block
  first); ``--help`` names the command as it is run (``usage: python -m train ...``), from the
  module that builds the parser."""

  def __init__(self, *args, **kwargs):
    if not args and "prog" not in kwargs:
      kwargs["prog"] = _module_prog(sys._getframe(1).f_globals.get("__name__", "__main__"))
    super().__init__(*args, **kwargs)

  def error(self, message: str) -> NoReturn:
    print(f"error: {message} (--help lists the arguments)", file=sys.stderr)
    sys.exit(2)
