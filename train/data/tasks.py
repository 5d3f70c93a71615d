"""Synthetic long-range tasks, made on the fly from ``(seed, index)``: associative recall, passkey,
variable tracking, each answer at a key-to-query distance drawn from a stated law.

A sequence is ``seq_len + 1`` int32 tokens: the ``SEPARATOR`` (a document start), then the task's
texts laid over a neutral filler text, the answer ending the sequence (passkey, vartrack) or
inside its query block (mqar). Its loss mask ``[seq_len]`` (float32) is 1 exactly on the targets
that are answer tokens: target ``t`` is ``tokens_T1[t + 1]``, read at input position ``t``.

    mqar      " kamipo:4821 " pairs (queried ones and distractors) over filler, then a block of
              queries " kamipo:4821 " ending the sequence, the farthest first (so the queried
              pairs come in the queries' order); the answers are the queries' values.
    passkey   " The pass key is 12345. Remember it. " in filler, then
              " What is the pass key? The pass key is 12345" ending the sequence.
    vartrack  chains " VAR kamipo = 12345. ", " VAR dorute = kamipo. ", ... over filler, then
              " PRINT <the queried chain's last name> = 12345" ending the sequence.

Each answer's distance is ``answer_start - value_start``: the index (in ``tokens_T1``) of the
answer's first token minus that of the first token of the value where the sequence gave it (mqar:
the pair's value, equally the distance between the key's two occurrences; passkey: the key in the
needle; vartrack: the number in the queried chain's first assignment). The model reads the first
answer token's target at input position ``answer_start - 1``, ``distance - 1`` tokens after the value.

Tokenizer-agnostic: every text is encoded on its own (``encode``) and the pieces' tokens
concatenated, so a key, value or number is the same tokens wherever it appears and the answer
tokens are exactly the value's; no piece may encode to ``SEPARATOR``. The task settings, their
checks and the texts are ``configs.tasks``'.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable, NamedTuple, Sequence

import grain
import numpy as np

from configs.tasks import (ASSIGN, CONSONANTS, FILLER, MAX_KEYS, NEEDLE, NUMBER_DIGITS, PAIR, PRINT, QUESTION,
                           VALUE_DIGITS, VOWELS, KEY_SYLLABLES, Distance, TaskSpec, parse_distance)
from train.data.text import SEPARATOR, process_batches, window_stream

__all__ = ["Answers", "Distance", "TaskBatch", "TaskGenerator", "TaskSample", "TaskSpec", "accuracy_by_distance",
           "is_task_row", "key_word", "mixed_dataset", "parse_distance", "score", "task_batch"]

Encode = Callable[[str], Sequence[int]]
MIX_STREAM = 0x6D6978  # seeds the task-or-text draw of each row, apart from the task sample's own draws
WORD_STRIDE = 104_729  # a prime not dividing MAX_KEYS: i -> i * stride mod MAX_KEYS is one-to-one


@functools.lru_cache(maxsize=None)
def key_word(i: int) -> str:
  """Word ``i`` (``0 <= i < MAX_KEYS``) of the key vocabulary: 3 consonant-vowel syllables, e.g.
  ``"kamipo"``. Consecutive ``i`` are spread over the word space, so the first 1000 words do not
  share their leading syllables."""
  w = (int(i) * WORD_STRIDE + 1) % MAX_KEYS
  syllables = []
  for _ in range(KEY_SYLLABLES):
    w, s = divmod(w, len(CONSONANTS) * len(VOWELS))
    syllables.append(CONSONANTS[s // len(VOWELS)] + VOWELS[s % len(VOWELS)])
  return "".join(syllables)


@dataclasses.dataclass(frozen=True)
class TaskSample:
  """One sequence. ``tokens_T1`` int32 ``[T + 1]``; ``mask_T`` float32 ``[T]``, 1 on answer targets.
  Per answer (int32 ``[n]``, in sequence order): ``target_starts``, the index in ``mask_T`` of its
  first token's target (the token is ``tokens_T1[target_start + 1]``); ``lengths`` in tokens;
  ``distances`` as the module docstring defines them."""

  tokens_T1: np.ndarray
  mask_T: np.ndarray
  target_starts: np.ndarray
  lengths: np.ndarray
  distances: np.ndarray


class Answers(NamedTuple):
  """The answers of a batch, flat (int32 ``[N]`` each): ``row`` in the batch, then as ``TaskSample``."""

  row: np.ndarray
  target_start: np.ndarray
  length: np.ndarray
  distance: np.ndarray


class TaskBatch(NamedTuple):
  """``tokens_BxT1`` int32 ``[B, T + 1]``, ``mask_BxT`` float32 ``[B, T]``, ``answers``."""

  tokens_BxT1: np.ndarray
  mask_BxT: np.ndarray
  answers: Answers


class TaskGenerator:
  """Makes the sequences of one ``TaskSpec`` (validated here) for one tokenizer's ``encode``."""

  def __init__(self, spec: TaskSpec, encode: Encode):
    self.spec = spec.validate()
    self.law: Distance = spec.law
    self._encode = encode
    self._pieces: dict[str, np.ndarray] = {}
    unit = self.piece(FILLER)
    self._filler = np.tile(unit, (spec.seq_len + 1) // len(unit) + 2)
    self._filler_period = len(unit)

  def piece(self, text: str) -> np.ndarray:
    """``text`` encoded on its own (int32, cached); raises ``ValueError`` if the tokenizer makes it
    empty or puts the ``SEPARATOR`` in it."""
    if text not in self._pieces:
      ids = np.asarray(self._encode(text), np.int32).reshape(-1)
      if ids.size == 0 or (ids == SEPARATOR).any():
        raise ValueError(f"the tokenizer encodes the task text {text!r} as {ids.tolist()}: a task needs a "
                         f"non-empty encoding without the separator token {SEPARATOR}")
      self._pieces[text] = ids
    return self._pieces[text]

  def join(self, texts: Sequence[str]) -> np.ndarray:
    return np.concatenate([self.piece(t) for t in texts])

  def sample(self, seed: int, index: int) -> TaskSample:
    """Sequence ``index`` of ``seed``: the same pair always gives the same sequence."""
    rng = np.random.default_rng([seed, index])
    phase = int(rng.integers(self._filler_period))
    tokens_T1 = self._filler[phase:phase + self.spec.seq_len + 1].copy()
    tokens_T1[0] = SEPARATOR
    make = {"mqar": self._mqar, "passkey": self._passkey, "vartrack": self._vartrack}[self.spec.name]
    answers, distances = make(rng, tokens_T1)  # writes the task's texts into tokens_T1
    mask_T = np.zeros(self.spec.seq_len, np.float32)
    starts, lengths = [], []
    for answer_start, length in answers:
      mask_T[answer_start - 1:answer_start - 1 + length] = 1
      starts.append(answer_start - 1)
      lengths.append(length)
    return TaskSample(tokens_T1, mask_T, np.asarray(starts, np.int32), np.asarray(lengths, np.int32),
                      np.asarray(distances, np.int32))

  def _mqar(self, rng: np.random.Generator, tokens_T1: np.ndarray) -> tuple[list[tuple[int, int]], list[int]]:
    """Queried pairs at their drawn distances before the query block (largest distance first, so
    that the pairs follow one another as their queries do and never overlap); distractor pairs in
    the gaps between them, spread at random."""
    spec, n_pairs, n_queries = self.spec, self.spec.pair_count, self.spec.queries
    keys = rng.choice(spec.keys, n_pairs, replace=False).tolist()
    values = [f"{v:0{VALUE_DIGITS}d}" for v in rng.choice(10 ** VALUE_DIGITS, n_pairs, replace=False).tolist()]
    opening, middle, closing = (self.piece(t) for t in PAIR)
    words = [self.piece(key_word(k)) for k in keys]
    items = [np.concatenate((opening, w, middle, self.piece(v), closing)) for w, v in zip(words, values)]
    distances = sorted(self.law.sample(rng, n_queries).tolist(), reverse=True)
    lengths = [len(x) for x in items[:n_queries]]
    block_start = len(tokens_T1) - sum(lengths)
    query_at = [block_start + before for before in itertools.accumulate(lengths[:-1], initial=0)]
    pair_at = [q - d for q, d in zip(query_at, distances)]
    if pair_at[0] < 1 or pair_at[-1] + lengths[-1] > block_start:
      raise AssertionError(f"mqar distances {distances} do not fit: TaskSpec.validate let them through")
    gaps = list(zip([1] + [a + n for a, n in zip(pair_at, lengths)], pair_at + [block_start]))
    distractors = items[n_queries:]
    if distractors:
      longest = max(len(x) for x in distractors)
      slots = np.repeat(np.arange(len(gaps)), [(end - start) // longest for start, end in gaps])
      if len(slots) < len(distractors):
        raise AssertionError(f"{len(distractors)} mqar distractors do not fit: TaskSpec.validate let them through")
      counts = np.bincount(slots[rng.choice(len(slots), len(distractors), replace=False)], minlength=len(gaps))
      bounds = [0, *itertools.accumulate(counts.tolist())]
      for (start, end), lo, hi in zip(gaps, bounds[:-1], bounds[1:]):
        self._spread(rng, tokens_T1, start, end, distractors[lo:hi])
    answers = []
    for j in range(n_queries):
      tokens_T1[pair_at[j]:pair_at[j] + lengths[j]] = items[j]
      tokens_T1[query_at[j]:query_at[j] + lengths[j]] = items[j]
      answers.append((query_at[j] + len(opening) + len(words[j]) + len(middle), len(self.piece(values[j]))))
    return answers, distances

  def _passkey(self, rng: np.random.Generator, tokens_T1: np.ndarray) -> tuple[list[tuple[int, int]], list[int]]:
    """The needle with its key at the drawn distance before the answer, which ends the sequence."""
    key = f"{int(rng.integers(10 ** NUMBER_DIGITS)):0{NUMBER_DIGITS}d}"
    distance = int(self.law.sample(rng, 1)[0])
    head, answer, needle, question = self.piece(NEEDLE[0]), self.piece(key), self.join([NEEDLE[0], key, NEEDLE[1]]), \
        self.piece(QUESTION)
    answer_start = len(tokens_T1) - len(answer)
    needle_at = answer_start - distance - len(head)
    if needle_at < 1 or needle_at + len(needle) > answer_start - len(question):
      raise AssertionError(f"passkey distance {distance} does not fit: TaskSpec.validate let it through")
    tokens_T1[needle_at:needle_at + len(needle)] = needle
    tokens_T1[answer_start - len(question):answer_start] = question
    tokens_T1[answer_start:] = answer
    return [(answer_start, len(answer))], [distance]

  def _vartrack(self, rng: np.random.Generator, tokens_T1: np.ndarray) -> tuple[list[tuple[int, int]], list[int]]:
    """The queried chain's first assignment at the drawn distance before the answer, its hops in
    order after it; the distractor chains' assignments (each chain in order, the chains
    interleaved at random) before and after it, as many before as fit at a random split."""
    spec, hops, n_chains = self.spec, self.spec.hops, self.spec.chain_count
    names = [key_word(k) for k in rng.choice(spec.keys, n_chains * (hops + 1), replace=False)]
    numbers = [f"{v:0{NUMBER_DIGITS}d}" for v in rng.choice(10 ** NUMBER_DIGITS, n_chains, replace=False)]
    chains = []
    for c in range(n_chains):
      chain_names = names[c * (hops + 1):(c + 1) * (hops + 1)]
      rhs = [numbers[c]] + chain_names[:-1]
      chains.append([self.join([ASSIGN[0], n, ASSIGN[1], r, ASSIGN[2]]) for n, r in zip(chain_names, rhs)])
    first, queried_hops = chains[0][0], chains[0][1:]
    query, answer = self.join([PRINT[0], names[hops], PRINT[1]]), self.piece(numbers[0])
    value_at = len(self.join([ASSIGN[0], names[0], ASSIGN[1]]))
    distance = int(self.law.sample(rng, 1)[0])
    answer_start = len(tokens_T1) - len(answer)
    query_at = answer_start - len(query)
    first_at = answer_start - distance - value_at
    first_end = first_at + len(first)
    hop_tokens = sum(len(x) for x in queried_hops)
    if first_at < 1 or first_end + hop_tokens > query_at:
      raise AssertionError(f"vartrack distance {distance} does not fit: TaskSpec.validate let it through")
    order = rng.permutation(np.repeat(np.arange(1, n_chains), hops + 1))  # which chain's next assignment comes
    cursor = [0] * n_chains
    distractors = []
    for c in order:
      distractors.append(chains[c][cursor[c]])
      cursor[c] += 1
    prefix = np.concatenate([[0], np.cumsum([len(x) for x in distractors])])
    fits_before = prefix <= first_at - 1
    fits_after = prefix[-1] - prefix + hop_tokens <= query_at - first_end
    splits = np.flatnonzero(fits_before & fits_after)
    if splits.size == 0:
      raise AssertionError("vartrack distractors do not fit: TaskSpec.validate let them through")
    split = int(rng.choice(splits))
    after = list(queried_hops) + distractors[split:]
    is_hop = rng.permutation(np.arange(len(after)) < len(queried_hops))  # a random merge keeping both orders
    hop_iter, distractor_iter = iter(after[:len(queried_hops)]), iter(after[len(queried_hops):])
    merged = [next(hop_iter) if h else next(distractor_iter) for h in is_hop]
    tokens_T1[first_at:first_end] = first
    self._spread(rng, tokens_T1, 1, first_at, distractors[:split])
    self._spread(rng, tokens_T1, first_end, query_at, merged)
    tokens_T1[query_at:answer_start] = query
    tokens_T1[answer_start:] = answer
    return [(answer_start, len(answer))], [distance]

  @staticmethod
  def _spread(rng: np.random.Generator, tokens_T1: np.ndarray, start: int, end: int, items: list[np.ndarray]) -> None:
    """Writes ``items`` in order into ``tokens_T1[start:end]``, the free tokens split at random
    among the ``len(items) + 1`` gaps around them (every split equally likely)."""
    if not items:
      return
    n, used = len(items), sum(len(x) for x in items)
    if end - start < used:
      raise AssertionError(f"{n} items of {used} tokens do not fit in {end - start}")
    picks = np.sort(rng.choice(end - start - used + n, n, replace=False)).tolist()
    written = 0
    for i, (pick, x) in enumerate(zip(picks, items)):  # item i has pick - i free tokens before it
      at = start + pick - i + written
      tokens_T1[at:at + len(x)] = x
      written += len(x)


def task_batch(spec: TaskSpec, encode: Encode, seed: int, indices: Sequence[int],
               generator: TaskGenerator | None = None) -> TaskBatch:
  """Sequences ``indices`` of ``seed`` stacked: ``TaskBatch`` (``[B, T + 1]`` int32, ``[B, T]``
  float32, the answers flat). Pass ``generator`` to reuse its encoded pieces across calls."""
  gen = generator or TaskGenerator(spec, encode)
  samples = [gen.sample(seed, i) for i in indices]
  rows = np.concatenate([np.full(len(s.lengths), b, np.int32) for b, s in enumerate(samples)])
  answers = Answers(rows, *(np.concatenate([getattr(s, f) for s in samples]).astype(np.int32)
                            for f in ("target_starts", "lengths", "distances")))
  return TaskBatch(np.stack([s.tokens_T1 for s in samples]), np.stack([s.mask_T for s in samples]), answers)


def score(preds_BxT: np.ndarray, tokens_BxT1: np.ndarray, answers: Answers) -> np.ndarray:
  """Exact match per answer (bool ``[N]``): every answer token's prediction is right.
  ``preds_BxT``: the argmax token ids at each input position (what ``tokens_BxT1[:, 1:]`` targets)."""
  preds_BxT, tokens_BxT1 = np.asarray(preds_BxT), np.asarray(tokens_BxT1)
  correct = np.empty(len(answers.row), bool)
  for n, (b, t, length) in enumerate(zip(answers.row, answers.target_start, answers.length)):
    correct[n] = np.array_equal(preds_BxT[b, t:t + length], tokens_BxT1[b, t + 1:t + 1 + length])
  return correct


def accuracy_by_distance(correct_N: np.ndarray, distance_N: np.ndarray, edges: Sequence[int] | None = None
                         ) -> list[dict]:
  """Exact-match accuracy per distance: one row ``{"distance", "answers", "accuracy"}`` per distinct
  distance (a grid law), or with ``edges`` one per bucket ``[edges[k], edges[k+1])``
  (``"distance": [lo, hi)``), empty buckets left out."""
  correct_N, distance_N = np.asarray(correct_N, bool), np.asarray(distance_N)
  if edges is None:
    keys, which = np.unique(distance_N, return_inverse=True)
    labels = [int(k) for k in keys]
  else:
    which = np.searchsorted(np.asarray(edges), distance_N, side="right") - 1
    labels = [[int(lo), int(hi)] for lo, hi in zip(edges[:-1], edges[1:])]
    inside = (which >= 0) & (which < len(labels))
    correct_N, which = correct_N[inside], which[inside]
  rows = []
  for k, label in enumerate(labels):
    hit = correct_N[which == k]
    if hit.size:
      rows.append({"distance": label, "answers": int(hit.size), "accuracy": float(hit.mean())})
  return rows


def is_task_row(seed: int, row: int, task_mix: float) -> bool:
  """Whether row ``row`` of the global training stream (step x batch + row in the batch) is a task
  sequence: a draw of its own ``(seed, row)``, true with probability ``task_mix``."""
  if task_mix >= 1 or task_mix <= 0:  # the draw cannot change the answer (it is in [0, 1))
    return task_mix >= 1
  return bool(np.random.default_rng([seed, MIX_STREAM, row]).random() < task_mix)


def mixed_dataset(tokens: np.ndarray, spec: TaskSpec, task_mix: float, encode: Encode, batch_size: int,
                  seed: int) -> grain.IterDataset:
  """The training pipeline with a task: ``train.data.text.train_dataset``'s text windows, each row
  replaced by task sequence ``row`` (``TaskGenerator.sample(seed, row)``) when ``is_task_row``,
  ``row`` counting the global stream's rows. Yields ``(tokens_bxT1 int32, mask_bxT float32)``
  per process batch of ``b = batch_size / process_count`` rows (``process_batches``: the same
  global batch for any process count); a text row's mask is all ones. Every row depends only on
  its index, so the iterator's state resumes the stream exactly."""
  gen = TaskGenerator(spec, encode)
  ones_T = np.ones(spec.seq_len, np.float32)
  windows = window_stream(tokens, spec.seq_len, seed)

  def row(global_row: int) -> tuple[np.ndarray, np.ndarray]:
    if is_task_row(seed, global_row, task_mix):
      sample = gen.sample(seed, global_row)
      return sample.tokens_T1, sample.mask_T
    return windows[global_row], ones_T  # read only here: the shuffle's index costs as much as a task row

  stream = grain.MapDataset.range(len(windows)).map(row)
  return process_batches(stream, batch_size).to_iter_dataset()
