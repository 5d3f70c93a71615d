"""The out-of-distribution evaluation texts (``train/data/ood``): present, as the manifest says,
UTF-8 documents of at least 1M characters each, and sharing no passage with the training corpus."""

import gzip
import hashlib
import io
import json
import random
import tarfile

import pytest

from train.data import ood
from train.data.ood import build

PASSAGE = 200  # characters of a sampled passage
SAMPLES = 200  # passages sampled per source
SEED = 20250530  # seed of the sampled passages


@pytest.fixture(scope="module")
def manifest() -> dict:
  return json.loads((build.HERE / "manifest.json").read_text())


@pytest.fixture(scope="module")
def documents() -> dict[str, list[dict]]:
  out = {}
  for name, path in ood.ood_paths().items():
    with gzip.open(path, "rt", encoding="utf-8") as f:
      out[name] = [json.loads(line) for line in f]
  return out


@pytest.fixture(scope="module")
def training() -> str:
  return build.training_text()


def test_sources_match_the_manifest(manifest):
  paths = ood.ood_paths()
  assert len(paths) >= 2 and set(paths) == set(manifest["sources"]) == set(build.ARCHIVES)
  for name, path in paths.items():
    entry = manifest["sources"][name]
    raw = path.read_bytes()
    assert path.name == entry["file"]
    assert hashlib.sha256(raw).hexdigest() == entry["sha256"], f"{path} differs from manifest.json"
    assert len(raw) == entry["gzip_bytes"] < 1_500_000
    assert (build.HERE / "LICENSE.md").read_text().count(f"`{name}`") >= 1


def test_documents_are_utf8_text_of_a_million_characters(documents, manifest):
  for name, docs in documents.items():
    entry = manifest["sources"][name]
    ids = [d["id"] for d in docs]
    assert set(docs[0]) == {"id", "text"} and ids == sorted(ids) and len(set(ids)) == len(ids) == entry["documents"]
    chars = sum(len(d["text"]) for d in docs)
    assert chars == entry["characters"] >= 1_000_000, name
    assert sum(len(d["text"].encode("utf-8")) for d in docs) == entry["utf8_bytes"]
    for d in docs:
      text = d["text"]
      assert text.endswith("\n") and not text.endswith("\n\n") and "\0" not in text and "\r" not in text


def test_the_trainer_reads_them():
  from train.data.text import load_documents  # imports jax: only here
  for name, path in ood.ood_paths().items():
    docs = load_documents(str(path))
    assert len(docs) > 10 and all(d["text"] for d in docs), name


def sampled_passages(docs: list[dict], rng: random.Random, n: int = SAMPLES) -> list[str]:
  """``n`` passages of ``PASSAGE`` characters at uniformly random character positions of the documents
  longer than a passage."""
  long = [d["text"] for d in docs if len(d["text"]) > PASSAGE]
  weights = [len(t) - PASSAGE for t in long]
  out = []
  for text in rng.choices(long, weights=weights, k=n):
    start = rng.randrange(len(text) - PASSAGE)
    out.append(text[start:start + PASSAGE])
  return out


def test_no_sampled_passage_occurs_in_the_training_corpus(documents, training):
  rng = random.Random(SEED)
  for name, docs in documents.items():
    shared = [p for p in sampled_passages(docs, rng) if p in training]
    assert not shared, f"{name}: {len(shared)} of {SAMPLES} passages occur in the training corpus, e.g. {shared[0]!r}"


def test_the_passage_check_finds_a_planted_passage(training):
  start = 5_000_000
  planted = training[start:start + 3000]
  assert "\0" not in planted
  docs = [{"id": "x", "text": "filler " * 40 + planted + " filler" * 40}]
  hits = [p for p in sampled_passages(docs, random.Random(SEED), 20) if p in training]
  assert len(hits) >= 10  # about 5 in 6 of the samples lie inside the planted 3000 characters


def test_overlap_index_measures_shared_passages(training):
  index = build.OverlapIndex(training)
  start = 5_000_003  # not a multiple of K: the shared passage is found through an aligned K-gram inside it
  for length in (130, 200, 1000):
    text = "\u2603" * 10 + training[start:start + length] + "\u2603" * 10
    assert index.longest_shared(text) >= length
  assert index.longest_shared("\u2603" * 500) == 0


def test_clean_is_deterministic_whitespace_normalisation():
  assert build.clean("\ufeffa  \r\nb\r\r\n\n\nc\t\n\n") == "a\nb\n\nc\n"
  assert build.clean("\n\n") == ""


def test_english_filter():
  assert build.is_english("Permission is hereby granted to any person obtaining a copy of the software.")
  assert not build.is_english("Der Lizenzgeber räumt Ihnen das Recht ein, das Werk zu vervielfältigen.")
  assert not build.is_english("")


def test_dict_numbers_and_debian_packages():
  assert build.dict_number("A") == 0 and build.dict_number("BA") == 64 and build.dict_number("/") == 63
  payload = io.BytesIO()
  with tarfile.open(fileobj=payload, mode="w") as tar:
    info = tarfile.TarInfo("./usr/x.txt")
    info.size = 2
    tar.addfile(info, io.BytesIO(b"hi"))
  data = gzip.compress(payload.getvalue(), mtime=0)

  def member(name: str, body: bytes) -> bytes:
    header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
    return header + body + b"\n" * (len(body) % 2)

  deb = b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("control.tar.gz", b"x") + member("data.tar.gz", data)
  with build.deb_data(deb) as tar:
    assert tar.extractfile("./usr/x.txt").read() == b"hi"
  with pytest.raises(ValueError, match="not a Debian package"):
    build.deb_data(b"PK")


def test_a_changed_archive_is_refused(tmp_path):
  name, file = "spdx-licenses", build.ARCHIVES["spdx-licenses"][3]
  (tmp_path / file).write_bytes(b"not the pinned archive")
  with pytest.raises(ValueError, match="not the pinned"):
    build.checked(name, tmp_path / file)
  with pytest.raises(ValueError, match="missing"):
    build.checked(name, tmp_path / "absent.tgz")


def test_ood_paths_names_a_missing_file(monkeypatch, tmp_path):
  monkeypatch.setitem(ood.SOURCES, "gone", tmp_path / "gone.jsonl.gz")
  with pytest.raises(FileNotFoundError, match="python -m train.data.ood.build"):
    ood.ood_paths()
