"""``python -m train.prepare --data PATH --out DIR``: tokenize a corpus of any size once.

One streaming pass (two with ``--tokenizer bpe``: the first trains it) over the ``.txt`` /
``.jsonl`` / ``.jsonl.gz`` files of ``PATH`` writes ``DIR/train.bin`` and ``DIR/heldout.bin`` (raw
token ids: uint8 for bytes, uint16 for a BPE of up to 65536 ids), ``DIR/manifest.json`` and, for
BPE, ``DIR/tokenizer.json``. Memory stays bounded by one document of a ``.jsonl`` file (a ``.txt``
file is read in blocks of about 1 MiB). ``python -m train --data DIR`` then memory-maps the token
files and reads its windows from them through Grain, without loading them.

Held-out split: documents whose id's sha1 ends in 0 or 1 (``train.data.text.is_heldout``; a ``.txt``
file is one document named by its path); when that leaves a side empty, the last document is split
inside itself: the last eighth of its tokens is held out.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import time
from typing import Iterator

import numpy as np

from fibjax.cli import ArgumentParser
from train.cli import exit_with, run_command
from train.data import text as data

BLOCK_CHARS = 1 << 20  # a .txt file is encoded this many characters (up to the next line end) at a time
COPY_TOKENS = 1 << 24  # tokens moved at a time when the last document is split
# A BPE's vocabulary: more than the 256 bytes (training's bound), at most what uint16 token files hold
BPE_VOCAB_SIZES = range(257, (1 << 16) + 1)


@dataclasses.dataclass
class TokenFile:
  """A token stream written to disk as it comes, with the span of its last document."""

  path: pathlib.Path
  dtype: np.dtype
  tokens: int = 0
  documents: int = 0
  last_start: int = 0  # offset of the last document's separator

  def __post_init__(self):
    self.file = self.path.open("wb")

  def add(self, tokens_per_block: Iterator[np.ndarray]) -> None:
    """Appends one document: the separator, then its blocks' tokens. An empty document is skipped."""
    start = self.tokens
    for tokens in tokens_per_block:
      if tokens.size and self.tokens == start:
        self.write(np.array([data.SEPARATOR]))
      self.write(tokens)
    if self.tokens > start:
      self.documents, self.last_start = self.documents + 1, start

  def write(self, tokens: np.ndarray) -> None:
    self.file.write(tokens.astype(self.dtype).tobytes())
    self.tokens += tokens.size

  def close(self) -> None:
    self.file.close()


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.int32)


def text_encoding(path: pathlib.Path) -> str:
  """``utf-8`` if the whole file decodes as UTF-8 (checked in blocks), else ``latin-1``, as
  ``train.data.text.read_text`` reads it; a file with NUL bytes is refused, as there."""
  decoder, utf8 = codecs.getincrementaldecoder("utf-8")(), True
  with path.open("rb") as f:
    while block := f.read(BLOCK_CHARS):
      if b"\0" in block:
        raise data.looks_binary(path)
      utf8 = utf8 and decodes(decoder, block)
  return "utf-8" if utf8 and decodes(decoder, b"", final=True) else "latin-1"


def decodes(decoder: codecs.IncrementalDecoder, block: bytes, final: bool = False) -> bool:
  """Whether ``block`` continues the decoder's text as valid UTF-8."""
  try:
    decoder.decode(block, final=final)
  except UnicodeDecodeError:
    return False
  return True


def text_blocks(path: pathlib.Path) -> Iterator[str]:
  """A ``.txt`` file's text in blocks of about ``BLOCK_CHARS``, each ending at a line end."""
  with path.open("r", encoding=text_encoding(path), newline="") as f:
    while block := f.read(BLOCK_CHARS):
      yield block + f.readline()


def documents(path: pathlib.Path) -> Iterator[tuple[str, Iterator[str]]]:
  """``(id, text blocks)`` of every document under ``path``, read lazily, ids as
  ``train.data.text.load_documents`` gives them."""
  for f in data.data_files(path):
    if f.suffix == ".txt":
      yield str(f.relative_to(path) if path.is_dir() else f.name), text_blocks(f)
    else:
      for doc in data.iter_jsonl(f):
        yield doc["id"], iter([doc["text"]])


def training_text(path: pathlib.Path) -> Iterator[dict]:
  """The training documents' text blocks as ``{"text"}`` records (what a BPE is trained on)."""
  for doc_id, blocks in documents(path):
    if not data.is_heldout(doc_id):
      yield from ({"text": block} for block in blocks)


def split_last_document(train: TokenFile, heldout: TokenFile) -> None:
  """When one side is empty, the last document (at the end of the other file) is split: the last
  eighth of its tokens moves to the held-out file, behind a separator of its own."""
  if train.tokens and heldout.tokens:
    return
  if not train.tokens:  # everything was held out: that file becomes the training one
    train.close(), heldout.close()
    heldout.path.replace(train.path)
    train.tokens, train.documents, train.last_start = heldout.tokens, heldout.documents, heldout.last_start
    heldout.tokens = heldout.documents = 0
    heldout.file = heldout.path.open("wb")
  train.close()
  content = train.tokens - train.last_start - 1
  cut = train.last_start + 1 + data.split_point(content)
  tail = np.memmap(train.path, dtype=train.dtype, mode="r", shape=(train.tokens,))[cut:]
  heldout.write(np.array([data.SEPARATOR]))
  for i in range(0, len(tail), COPY_TOKENS):
    heldout.write(np.asarray(tail[i : i + COPY_TOKENS]))
  heldout.documents = 1
  del tail
  os.truncate(train.path, cut * train.dtype.itemsize)
  train.tokens = cut


def file_sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(1 << 24):
      h.update(chunk)
  return h.hexdigest()


def prepare(source: pathlib.Path, out: pathlib.Path, tokenizer: str = "byte", bpe_vocab_size: int = 4096) -> dict:
  """Tokenizes ``source`` into the prepared folder ``out`` (see the module docstring); returns the
  manifest. The folder appears only when complete (it is written as ``out.partial`` first).

  Raises:
    ValueError: ``out`` exists, ``source`` is missing or holds no text, or a ``.jsonl`` line is bad.
  """
  source, out = source.resolve(), out.resolve()
  if out.exists():
    raise ValueError(f"--out {out} already exists: give a new folder (nothing there is overwritten)")
  if tokenizer not in ("byte", "bpe"):
    raise ValueError(f"--tokenizer must be byte or bpe, got {tokenizer!r}")
  if bpe_vocab_size not in BPE_VOCAB_SIZES:
    raise ValueError(f"--bpe-vocab-size must be in {BPE_VOCAB_SIZES.start}..{BPE_VOCAB_SIZES.stop - 1} (the 256 "
                     f"bytes plus merges, in uint16 token files), got {bpe_vocab_size}")
  data.data_files(source)  # a missing path or a wrong kind of file fails before any work
  partial = out.with_name(out.name + ".partial")
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  try:
    manifest = write_tokens(source, partial, tokenizer, bpe_vocab_size)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  partial.replace(out)
  return manifest


def write_tokens(source: pathlib.Path, folder: pathlib.Path, tokenizer: str, bpe_vocab_size: int) -> dict:
  if tokenizer == "bpe":
    tok = data.BPETokenizer.train(training_text(source), bpe_vocab_size)
    tok.save(folder / data.PREPARED_TOKENIZER)
  else:
    tok = data.ByteTokenizer()
  dtype = token_dtype(tok.vocab_size)
  train, heldout = TokenFile(folder / "train.bin", dtype), TokenFile(folder / "heldout.bin", dtype)
  for doc_id, blocks in documents(source):
    (heldout if data.is_heldout(doc_id) else train).add(tok.encode(block) for block in blocks)
  if not train.tokens and not heldout.tokens:
    raise data.no_text(source)
  split_last_document(train, heldout)
  train.close(), heldout.close()
  hashes = [file_sha256(f.path) for f in (train, heldout)]
  manifest = {
      "format": data.PREPARED_FORMAT, "tokenizer": tokenizer, "vocab_size": tok.vocab_size, "dtype": dtype.name,
      "train": {"file": train.path.name, "tokens": train.tokens, "documents": train.documents},
      "heldout": {"file": heldout.path.name, "tokens": heldout.tokens, "documents": heldout.documents},
      "tokens_sha256": hashlib.sha256("".join(hashes).encode()).hexdigest(), "source": str(source),
  }
  (folder / data.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
  return manifest


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", required=True, type=pathlib.Path, help="a .txt/.jsonl/.jsonl.gz file or a folder")
  parser.add_argument("--out", required=True, type=pathlib.Path, help="the prepared folder to create")
  parser.add_argument("--tokenizer", default="byte", help="byte (default) or bpe")
  parser.add_argument("--bpe-vocab-size", type=int, default=4096)
  return run_command(prepare_and_report, parser, argv, interrupted=lambda args: f"{args.out} was not written")


def prepare_and_report(args: argparse.Namespace) -> int:
  """Prepares ``--data`` into ``--out`` and prints what it holds and how to train on it."""
  start = time.perf_counter()
  manifest = prepare(args.data, args.out, args.tokenizer, args.bpe_vocab_size)
  t, h = manifest["train"], manifest["heldout"]
  print(f"prepared {args.out} in {time.perf_counter() - start:.1f} s: {t['tokens']:,} training tokens "
        f"({t['documents']:,} documents), {h['tokens']:,} held-out ({h['documents']:,}); "
        f"train with python -m train --data {args.out}"
        + (f" --set {' '.join(data.prepared_overrides(manifest))}" if manifest["tokenizer"] != "byte" else ""))
  return 0


if __name__ == "__main__":
  exit_with(main())
