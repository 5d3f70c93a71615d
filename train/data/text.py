"""Data: documents, the held-out split, tokenizers, and the Grain pipeline of training windows."""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import mmap
import pathlib
import zlib
from typing import Iterator, Protocol

import grain
import jax
import numpy as np

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
CORPUS = pathlib.Path(__file__).parent / "corpus" / "corpus.jsonl.gz"
SEPARATOR = 0  # token that starts every document (byte 0 never occurs in the text)
HELDOUT_TAIL = 8  # a document split inside itself holds out its last 1/HELDOUT_TAIL


def iter_jsonl(path: pathlib.Path) -> Iterator[dict]:
  """Documents ``{"id", "text"}`` of a ``.jsonl``/``.jsonl.gz`` file, one line at a time. A file
  that is not gzip data (``.gz``) or not UTF-8 text raises ``ValueError`` naming it."""
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be an object with a 'text' field") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
          raise ValueError(f"{path}:{n}: each line must be a JSON object with a string 'text' field")
        yield {"id": str(record.get("id", f"{path.name}:{n}")), "text": record["text"]}
  except UnicodeDecodeError as e:
    raise not_utf8(path, opener) from e
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # only gzip.open raises these
    raise ValueError(f"{path}: not gzip data, or cut short ({e}); re-save it with gzip or drop the .gz suffix") from e


def not_utf8(path: pathlib.Path, opener) -> ValueError:
  """The error for a file that does not decode as UTF-8, naming its first bad byte and where it is
  (in the decompressed text of a ``.gz`` file)."""
  decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
  with opener(path, "rb") as f:
    while True:
      block = f.read(1 << 20)
      try:
        decoder.decode(block, final=not block)
      except UnicodeDecodeError as e:  # e.object: the bytes the decoder still held, then this block
        bad, where = e.object[e.start], offset - (len(e.object) - len(block)) + e.start
        break
      if not block:
        return ValueError(f"{path}: not UTF-8 text; re-save it as UTF-8")
      offset += len(block)
  after = " after decompression" if path.suffix == ".gz" else ""
  return ValueError(f"{path}: not UTF-8 text (byte 0x{bad:02x} at offset {where}{after}); re-save it as UTF-8")


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  return list(iter_jsonl(path))


def data_files(path: pathlib.Path) -> list[pathlib.Path]:
  """The ``.txt``/``.jsonl``/``.jsonl.gz`` files of a data path (a file, or a folder searched
  recursively), sorted; raises ``ValueError`` for a missing path or a file of another kind."""
  if not path.exists():
    raise ValueError(f"data path {str(path)!r} does not exist: give a .txt, .jsonl or .jsonl.gz file, or a folder of "
                     "them (relative paths start from the current folder)")
  if path.is_dir():
    return sorted(x for x in path.rglob("*") if x.is_file() and x.name.endswith(TEXT_SUFFIXES))
  if not path.name.endswith(TEXT_SUFFIXES):
    raise ValueError(f"data file {path} must end in .txt, .jsonl or .jsonl.gz")
  return [path]


def read_text(path: pathlib.Path) -> str:
  """A ``.txt`` file's text: UTF-8, else Latin-1. A file with NUL bytes is refused (``looks_binary``)."""
  raw = path.read_bytes()
  if b"\0" in raw:
    raise looks_binary(path)
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    return raw.decode("latin-1")


def looks_binary(path: pathlib.Path) -> ValueError:
  """The error for a ``.txt`` file holding NUL bytes, which text never does (and which would read as
  document separators)."""
  return ValueError(f"{path} holds NUL bytes, so it looks binary, not text; remove it from the data or "
                    "give a text file")


def load_documents(path: str | None = None, purpose: str = "training") -> list[dict]:
  """Documents ``{"id", "text"}``: the embedded corpus (``None``), a ``.txt`` file (one document),
  a ``.jsonl``/``.jsonl.gz`` file (one object with ``"text"`` per line), or a folder of those.
  Documents without text are dropped; raises ``ValueError`` when none is left, naming the text's
  ``purpose`` (``training``, ``evaluation``)."""
  if path is None:
    return _read_jsonl(CORPUS)
  p = pathlib.Path(path)
  docs: list[dict] = []
  for f in data_files(p):
    if f.suffix == ".txt":
      docs.append({"id": str(f.relative_to(p) if p.is_dir() else f.name), "text": read_text(f)})
    else:
      docs += _read_jsonl(f)
  docs = [d for d in docs if d["text"]]
  if not docs:
    raise no_text(p, purpose)
  return docs


def no_text(path: pathlib.Path, purpose: str = "training") -> ValueError:
  where = f"{str(path)!r} is empty" if path.is_file() else f"no .txt/.jsonl file under {str(path)!r} holds any text"
  return ValueError(f"no {purpose} text: {where}; give a file or folder with text")


def fingerprint(path: str | None) -> str | None:
  """sha256 of a data path's content (file names relative to it, then bytes), so that a corpus can
  be moved and given again; a prepared folder's is its manifest's token hash; ``None``: embedded."""
  if path is None:
    return None
  p = pathlib.Path(path)
  if is_prepared(p):
    return read_manifest(p)["tokens_sha256"]
  h = hashlib.sha256()
  for f in data_files(p):
    h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + b"\0")
    with f.open("rb") as src:
      while chunk := src.read(1 << 20):
        h.update(chunk)
  return h.hexdigest()


def is_heldout(doc_id: str) -> bool:
  """The fixed held-out rule: the sha1 of the id ends in hex digit 0 or 1 (about 1/8)."""
  return hashlib.sha1(doc_id.encode("utf-8")).hexdigest()[-1] in "01"


def split_documents(docs: list[dict]) -> tuple[list[dict], list[dict]]:
  """``(train, heldout)`` by ``is_heldout``. When that rule leaves either side empty (a corpus of a
  few documents, e.g. one ``.txt`` file), every document but the last trains and the last one is
  split: its first seven eighths train, its last eighth (``split_point``) is held out."""
  train = [d for d in docs if not is_heldout(d["id"])]
  heldout = [d for d in docs if is_heldout(d["id"])]
  if train and heldout:
    return train, heldout
  *head, last = docs
  cut = split_point(len(last["text"]))
  return head + [{"id": last["id"], "text": last["text"][:cut]}], [{"id": f"{last['id']}#tail", "text": last["text"][cut:]}]


def split_point(length: int) -> int:
  """Where a document split inside itself ends its training part: its last eighth is held out."""
  return length - length // HELDOUT_TAIL


MANIFEST = "manifest.json"  # marks a folder written by ``python -m train.prepare``
PREPARED_TOKENIZER = "tokenizer.json"  # a prepared folder's BPE (a byte folder has none)
PREPARED_FORMAT = "fibjax-tokens/1"


def is_prepared(path: pathlib.Path) -> bool:
  """Whether ``path`` is a prepared token folder (``python -m train.prepare``)."""
  return path.is_dir() and (path / MANIFEST).is_file()


def prepared_overrides(manifest: dict) -> list[str]:
  """The ``--set`` overrides a run needs to train from a prepared folder: its tokenizer and vocabulary."""
  v = manifest["vocab_size"]
  if manifest["tokenizer"] == "byte":
    return ["tokenizer=byte", f"model.vocab_size={v}"]
  return ["tokenizer=bpe", f"bpe_vocab_size={v}", f"model.vocab_size={v}"]


def read_manifest(path: pathlib.Path) -> dict:
  """A prepared folder's manifest; raises ``ValueError`` if it is not one this version reads."""
  try:
    manifest = json.loads((path / MANIFEST).read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path / MANIFEST} cannot be read ({e}); prepare the corpus again with python -m train.prepare") from e
  if not isinstance(manifest, dict) or manifest.get("format") != PREPARED_FORMAT:
    raise ValueError(f"{path / MANIFEST} is not a {PREPARED_FORMAT} manifest; prepare the corpus again with "
                     "python -m train.prepare")
  return manifest


def open_prepared(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray, dict]:
  """``(train, heldout, manifest)`` of a prepared folder: the token files memory-mapped, not read."""
  manifest = read_manifest(path)
  streams = []
  for split in ("train", "heldout"):
    entry = manifest[split]
    file = path / entry["file"]
    size = file.stat().st_size if file.exists() else -1
    if size != entry["tokens"] * np.dtype(manifest["dtype"]).itemsize:
      raise ValueError(f"{file} holds {size} bytes, not the manifest's {entry['tokens']} {manifest['dtype']} tokens; "
                       "prepare the corpus again with python -m train.prepare")
    streams.append(map_tokens(file, np.dtype(manifest["dtype"])))
  return streams[0], streams[1], manifest


def map_tokens(file: pathlib.Path, dtype: np.dtype) -> np.ndarray:
  """A read-only array over the memory-mapped token file; nothing is read until used. Windows are
  read in random order, so the kernel is told not to read ahead around each one."""
  if file.stat().st_size == 0:
    return np.zeros(0, dtype)
  with file.open("rb") as f:
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  if hasattr(mmap, "MADV_RANDOM"):
    mapped.madvise(mmap.MADV_RANDOM)
  return np.frombuffer(mapped, dtype)


class Tokenizer(Protocol):
  vocab_size: int

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as tokens, vocab 256; token 0 is the document separator."""

  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")


class BPETokenizer:
  """Byte-level BPE trained locally with ``tokenizers`` on the training documents only."""

  def __init__(self, tok):
    self.tok = tok
    self.vocab_size = tok.get_vocab_size()

  @classmethod
  def train(cls, docs: list[dict], vocab_size: int) -> "BPETokenizer":
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<doc>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # no bar: it prints blank lines
    tok.train_from_iterator((d["text"] for d in docs), trainer=trainer)
    return cls(tok)

  @classmethod
  def load(cls, path: pathlib.Path) -> "BPETokenizer":
    from tokenizers import Tokenizer as HFTokenizer  # noqa: PLC0415

    return cls(HFTokenizer.from_file(str(path)))

  def save(self, path: pathlib.Path) -> None:
    self.tok.save(str(path))

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tok.encode(text).ids, np.int32)

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids if int(i) != SEPARATOR])


def tokenize(docs: list[dict], tokenizer: Tokenizer) -> np.ndarray:
  """One int32 stream: each document is ``SEPARATOR`` followed by its tokens."""
  parts = []
  for d in docs:
    parts += [np.array([SEPARATOR], np.int32), tokenizer.encode(d["text"])]
  return np.concatenate(parts)


class Windows:
  """Random-access source of non-overlapping windows of ``length + 1`` tokens (stride ``length``)."""

  def __init__(self, tokens: np.ndarray, length: int):
    if len(tokens) < length + 1:
      raise ValueError(f"{len(tokens)} tokens cannot fill one window of {length + 1}; use more data or a shorter seq_len")
    self.tokens, self.length = tokens, length

  def __len__(self) -> int:
    return (len(self.tokens) - 1) // self.length

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self.length
    return np.asarray(self.tokens[start : start + self.length + 1], np.int32)


def window_stream(tokens: np.ndarray, seq_len: int, seed: int) -> grain.MapDataset:
  """The global stream of training windows of T+1 (int32), unbatched: every window, seeded
  shuffle (fresh order every epoch), endless; the same for every process (``process_batches``
  gives each its rows). Lazy: a window is read only when a process reads its row."""
  return grain.MapDataset.source(Windows(tokens, seq_len)).shuffle(seed=seed).repeat(None)


def process_batches(stream: grain.MapDataset, batch_size: int) -> grain.MapDataset:
  """This process's batches of the global ``stream``: step ``s``'s global batch is rows ``s*B ..
  (s+1)*B - 1`` of the stream (``B = batch_size``), and process ``p`` of ``n`` takes its block
  ``p*b .. (p+1)*b - 1`` (``b = B / n`` rows, the block of the global batch on its devices,
  ``train.run.mesh.make_mesh``). A step's global batch is thus the same for any process count,
  and so is the iterator's state (the step count). Raises ``ValueError`` unless ``n`` divides ``B``."""
  count, index = jax.process_count(), jax.process_index()
  if batch_size % count:
    raise ValueError(f"batch_size {batch_size} must be divisible by the process count {count}")
  return stream.batch(batch_size // count, drop_remainder=True)[index::count]


def train_dataset(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> grain.IterDataset:
  """Grain pipeline: ``window_stream``'s windows in this process's batches of ``batch_size /
  process_count`` rows (``process_batches``)."""
  return process_batches(window_stream(tokens, seq_len, seed), batch_size).to_iter_dataset()


def data_budget(tokens_per_step: int, steps: int, seq_len: int, train_tokens: int) -> dict[str, float]:
  """What a run trains on: ``training_tokens`` (steps x batch x T), the distinct training targets
  the corpus offers in windows of T (``corpus_train_tokens``) and ``repeats``, their ratio (epochs)."""
  distinct = ((train_tokens - 1) // seq_len) * seq_len
  total = tokens_per_step * steps
  return {"training_tokens": total, "corpus_train_tokens": distinct, "repeats": total / max(distinct, 1)}


def save_heldout(tokens: np.ndarray, path: pathlib.Path) -> None:
  """Writes the held-out token stream (``.npy``, uint16 when the vocabulary fits) into a run, so that
  evaluation never needs the training corpus."""
  dtype = np.uint16 if tokens.size == 0 or int(tokens.max()) < 2**16 else np.int32
  np.save(path, tokens.astype(dtype))


def eval_windows(tokens: np.ndarray, length: int, max_tokens: int) -> np.ndarray:
  """Consecutive held-out windows ``[n, length + 1]`` covering at most ``max_tokens`` targets."""
  src = Windows(tokens, length)
  n = max(1, min(len(src), max_tokens // length))
  return np.stack([src[i] for i in range(n)])
