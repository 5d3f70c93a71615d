"""Data: documents, the held-out split, tokenizers, and the Grain pipeline of training windows."""

from __future__ import annotations

import gzip
import hashlib
import json
import pathlib
from typing import Protocol

import grain
import jax
import numpy as np

CORPUS = pathlib.Path(__file__).parent / "corpus" / "corpus.jsonl.gz"
SEPARATOR = 0  # token that starts every document (byte 0 never occurs in the text)


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  opener = gzip.open if path.suffix == ".gz" else open
  docs = []
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
      docs.append({"id": str(record.get("id", f"{path.name}:{n}")), "text": record["text"]})
  return docs


def load_documents(path: str | None = None) -> list[dict]:
  """Documents ``{"id", "text"}``: the embedded corpus (``None``), a ``.txt`` file (one document),
  a ``.jsonl``/``.jsonl.gz`` file (one object with ``"text"`` per line), or a folder of those."""
  if path is None:
    return _read_jsonl(CORPUS)
  p = pathlib.Path(path)
  if not p.exists():
    raise ValueError(f"data path {path!r} does not exist")
  files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
  docs: list[dict] = []
  for f in files:
    if f.name.endswith((".jsonl", ".jsonl.gz")):
      docs += _read_jsonl(f)
    elif f.suffix == ".txt":
      raw = f.read_bytes()
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError:
        text = raw.decode("latin-1")
      docs.append({"id": str(f.relative_to(p) if p.is_dir() else f.name), "text": text})
    elif not p.is_dir():
      raise ValueError(f"data file {f} must end in .txt, .jsonl or .jsonl.gz")
  if not docs:
    raise ValueError(f"no documents (.txt/.jsonl) found under {path!r}")
  return docs


def is_heldout(doc_id: str) -> bool:
  """The fixed held-out rule: the sha1 of the id ends in hex digit 0 or 1 (about 1/8)."""
  return hashlib.sha1(doc_id.encode("utf-8")).hexdigest()[-1] in "01"


def split_documents(docs: list[dict]) -> tuple[list[dict], list[dict]]:
  """``(train, heldout)`` by ``is_heldout``; a corpus too small for the rule holds out its last doc."""
  train = [d for d in docs if not is_heldout(d["id"])]
  heldout = [d for d in docs if is_heldout(d["id"])]
  if not heldout or not train:
    if len(docs) < 2:
      raise ValueError("need at least 2 documents to split off held-out data")
    train, heldout = docs[:-1], docs[-1:]
  return train, heldout


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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<doc>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
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
    return self.tokens[start : start + self.length + 1]


def train_dataset(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> grain.IterDataset:
  """Grain pipeline: windows of T+1, this process's shard, seeded shuffle (fresh order every
  epoch), endless, batched to ``batch_size / process_count`` rows per process."""
  count, index = jax.process_count(), jax.process_index()
  if batch_size % count:
    raise ValueError(f"batch_size {batch_size} must be divisible by the process count {count}")
  ds = grain.MapDataset.source(Windows(tokens, seq_len))[index::count]
  ds = ds.shuffle(seed=seed).repeat(None).batch(batch_size // count, drop_remainder=True)
  return ds.to_iter_dataset()


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
