"""Settings of the synthetic long-range tasks (not a recipe): ``TaskSpec``, its distance law, the texts.

The sequences themselves are made by ``train.data.tasks``; this module holds what a valid task is,
so that ``TrainConfig.validate`` refuses a bad one before training (``configs`` sits below ``train``).

Every length check here is made at byte level: a word of the key vocabulary is 6 bytes, a value
4 digits, a passkey or a tracked number 5 digits, plus the texts below. A tokenizer whose tokens
each cover one byte or more (byte level, and the byte-level BPE of ``train.data.text``) makes every
piece at most that many tokens, so a task that fits at byte level fits for it too; distances are
counted in tokens of the run's tokenizer.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

TASKS = ("mqar", "passkey", "vartrack")
# The TaskSpec fields each task reads (the others keep their defaults: a value there would change nothing).
SETTINGS = {"mqar": ("distance", "pairs", "queries", "keys"), "passkey": ("distance",),
            "vartrack": ("distance", "hops", "chains", "keys")}

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
KEY_SYLLABLES = 3  # a key (mqar) or variable name (vartrack): 3 consonant-vowel syllables, e.g. "kamipo"
MAX_KEYS = (len(CONSONANTS) * len(VOWELS)) ** KEY_SYLLABLES  # 343,000 distinct words
MIN_KEYS = 1000
WORD_BYTES = 2 * KEY_SYLLABLES
VALUE_DIGITS = 4  # mqar values "0000".."9999"
NUMBER_DIGITS = 5  # passkeys and the numbers vartrack assigns, "00000".."99999"

# Each text below is encoded on its own and the pieces' tokens concatenated, so that a key, value or
# number is the same tokens wherever it appears (see train.data.tasks).
PAIR = (" ", ":", " ")  # mqar pair and query: " " key ":" value " "
NEEDLE = (" The pass key is ", ". Remember it. ")  # passkey: the key goes between the two
QUESTION = " What is the pass key? The pass key is "  # then the key, the answer, ends the sequence
ASSIGN = (" VAR ", " = ", ". ")  # vartrack: " VAR " name " = " number-or-name ". "
PRINT = (" PRINT ", " = ")  # vartrack query: " PRINT " last-name " = ", then the number ends the sequence
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def nbytes(*texts: str) -> int:
  return sum(len(t.encode("utf-8")) for t in texts)


PAIR_BYTES = nbytes(*PAIR) + WORD_BYTES + VALUE_DIGITS
ASSIGN_BYTES = nbytes(*ASSIGN) + WORD_BYTES + max(WORD_BYTES, NUMBER_DIGITS)  # the longest assignment
FIRST_ASSIGN_BYTES = nbytes(*ASSIGN) + WORD_BYTES + NUMBER_DIGITS  # "VAR name = number"
PRINT_BYTES = nbytes(*PRINT) + WORD_BYTES
DISTANCE_FORMS = "'uniform' (every distance the task allows), 'uniform:LO:HI' or 'grid:D1,D2,...'"


@dataclasses.dataclass(frozen=True)
class Distance:
  """A law of key-to-query distances (tokens): ``uniform`` over the integers ``lo..hi`` (inclusive),
  or ``grid``: one of ``values``, each equally likely, so accuracy can be read per distance."""

  kind: Literal["uniform", "grid"]
  values: tuple[int, ...]  # uniform: (lo, hi); grid: the distances, ascending

  @property
  def lo(self) -> int:
    return min(self.values)

  @property
  def hi(self) -> int:
    return max(self.values)

  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` independent distances (int64 ``[n]``)."""
    if self.kind == "uniform":
      return rng.integers(self.lo, self.hi + 1, size=n)
    return rng.choice(np.asarray(self.values, np.int64), size=n)

  def __str__(self) -> str:
    if self.kind == "uniform":
      return f"uniform:{self.lo}:{self.hi}"
    return "grid:" + ",".join(str(v) for v in self.values)


def parse_distance(text: str, shortest: int, longest: int) -> Distance:
  """``"uniform"`` (= ``uniform:shortest:longest``), ``"uniform:LO:HI"`` or ``"grid:D1,D2,..."``;
  raises ``ValueError`` in one line for any other text. Ranges are checked by ``TaskSpec.validate``."""
  kind, _, rest = text.strip().partition(":")
  try:
    if kind == "uniform" and not rest:
      return Distance("uniform", (shortest, longest))
    if kind == "uniform":
      lo, hi = (int(x) for x in rest.split(":"))
      if 1 <= lo <= hi:
        return Distance("uniform", (lo, hi))
    elif kind == "grid":
      values = tuple(sorted({int(x) for x in rest.split(",")}))
      if values and values[0] >= 1:
        return Distance("grid", values)
  except ValueError:
    pass
  raise ValueError(f"task_distance={text!r} must be {DISTANCE_FORMS} with integer distances 1 <= LO <= HI "
                   f"(e.g. task_distance=uniform:64:512 or task_distance=grid:64,256,1024)")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One synthetic task; its error messages name the ``TrainConfig`` fields (``task_pairs``, ...).

  Attributes:
    name: ``mqar`` (multi-query associative recall), ``passkey`` or ``vartrack`` (variable tracking).
    seq_len: T; each sequence is T + 1 tokens (T inputs, T targets).
    distance: the law of each answer's distance (``Distance``, ``parse_distance``), in tokens: the
      answer's first token minus the first token of the value where the sequence gave it (mqar: the
      value in its pair, which is also the distance between the key's two occurrences; passkey:
      the key in the needle; vartrack: the number in the chain's first assignment).
    pairs: mqar: key-value pairs in the context, the queried ones included (the rest are
      distractors, never asked); ``None``: as many as always fit.
    queries: mqar: pairs asked for, at the sequence's end.
    hops: vartrack: the queried chain's variable-to-variable assignments after its first
      (``VAR a = 12345``, ``VAR b = a``, ``VAR c = b`` is 2 hops), as RULER counts them.
    chains: vartrack: chains of ``hops + 1`` assignments, one queried, the rest distractors with
      numbers of their own; ``None``: as many as always fit.
    keys: the key vocabulary (mqar keys, vartrack names), ``MIN_KEYS..MAX_KEYS`` words.
  """

  name: str
  seq_len: int
  distance: str = "uniform"
  pairs: int | None = None
  queries: int = 4
  hops: int = 2
  chains: int | None = None
  keys: int = 4096

  @property
  def law(self) -> Distance:
    return parse_distance(self.distance, self.shortest, self.longest)

  @property
  def shortest(self) -> int:
    """The shortest distance every sequence of this task can place (byte level)."""
    if self.name == "mqar":
      return self.queries * PAIR_BYTES  # a queried pair ends before the query block begins
    if self.name == "passkey":
      return NUMBER_DIGITS + nbytes(NEEDLE[1], QUESTION)
    return NUMBER_DIGITS + nbytes(ASSIGN[2]) + self.hops * ASSIGN_BYTES + PRINT_BYTES

  @property
  def longest(self) -> int:
    """The longest distance every sequence can place: the stored value's text starts after the
    sequence's leading separator and the answer ends the sequence (byte level)."""
    if self.name == "mqar":
      return self.seq_len - self.queries * PAIR_BYTES
    if self.name == "passkey":
      return self.seq_len - NUMBER_DIGITS - nbytes(NEEDLE[0])
    return self.seq_len - NUMBER_DIGITS - (FIRST_ASSIGN_BYTES - NUMBER_DIGITS - nbytes(ASSIGN[2]))

  @property
  def pair_count(self) -> int:
    """mqar: the pairs of each sequence (``pairs``, or as many as always fit and the keys and
    values allow)."""
    if self.pairs is None:
      return min(self.queries + self._distractor_room(), self.keys, 10 ** VALUE_DIGITS)
    return self.pairs

  def _distractor_room(self) -> int:
    """Distractor pairs that always fit beside the queried pairs and the query block: the Q + 1
    gaps between the queried pairs each waste less than one pair."""
    free = self.seq_len - 2 * self.queries * PAIR_BYTES - (self.queries + 1) * (PAIR_BYTES - 1)
    return max(0, free // PAIR_BYTES)

  @property
  def chain_count(self) -> int:
    """vartrack: the chains of each sequence (``chains``, or as many as always fit and the names
    allow)."""
    if self.chains is None:
      return min(1 + self._chain_room() // (self.hops + 1), self.keys // (self.hops + 1))
    return self.chains

  def _chain_room(self) -> int:
    """Distractor assignments that always fit: the free tokens, less one assignment (the split of
    the distractors before and after the first assignment wastes less than one)."""
    free = self.seq_len - FIRST_ASSIGN_BYTES - PRINT_BYTES - NUMBER_DIGITS - self.hops * ASSIGN_BYTES
    return max(0, free // ASSIGN_BYTES - 1)

  def validate(self) -> "TaskSpec":
    """Raises ``ValueError`` in one line naming the bad setting and the fix; returns self."""
    if self.name not in TASKS:
      raise ValueError(f"task={self.name!r} is unknown: choose one of {', '.join(TASKS)} (or task=none for text alone)")
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name not in ("name", "seq_len", *SETTINGS[self.name]) and value != f.default:
        owners = " and ".join(t for t in TASKS if f.name in SETTINGS[t])
        raise ValueError(f"task_{f.name}={value} is a setting of {owners}, not of task={self.name}, so it would change "
                         f"nothing: leave it out (its default is {'none' if f.default is None else f.default})")
    for field, value, least in (("model.seq_len", self.seq_len, 1), ("task_queries", self.queries, 1),
                                ("task_hops", self.hops, 1)):
      if not isinstance(value, int) or value < least:
        raise ValueError(f"{field} must be an int >= {least}, got {value!r}")
    if not (isinstance(self.keys, int) and MIN_KEYS <= self.keys <= MAX_KEYS):
      raise ValueError(f"task_keys must be an int in [{MIN_KEYS}, {MAX_KEYS}] (the key vocabulary), got {self.keys!r}")
    for field, value in (("task_pairs", self.pairs), ("task_chains", self.chains)):
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{field} must be an int >= 1 or none (as many as fit), got {value!r}")
    what = {"mqar": f"mqar with task_queries={self.queries}", "passkey": "passkey",
            "vartrack": f"vartrack with task_hops={self.hops}"}[self.name]
    fix = {"mqar": "lower task_queries", "passkey": "", "vartrack": "lower task_hops"}[self.name]
    if self.shortest > self.longest:
      raise ValueError(f"model.seq_len={self.seq_len} is too short for {what}: its shortest distance, "
                       f"{self.shortest} tokens, leaves no room; {fix + ' or ' if fix else ''}raise model.seq_len")
    law = self.law
    if law.hi > self.longest:
      raise ValueError(f"task_distance={self.distance} reaches {law.hi} tokens, beyond the {self.longest} that "
                       f"model.seq_len={self.seq_len} allows for {what}: lower the distance or raise model.seq_len")
    if law.lo < self.shortest:
      raise ValueError(f"task_distance={self.distance} starts at {law.lo} tokens, below the shortest distance of "
                       f"{what} ({self.shortest} tokens at byte level): raise the distance"
                       f"{' or ' + fix if fix else ''}")
    if self.name == "mqar":
      self._validate_pairs()
    if self.name == "vartrack":
      self._validate_chains()
    return self

  def _validate_pairs(self) -> None:
    if self.pairs is not None and self.pairs < self.queries:
      raise ValueError(f"task_pairs={self.pairs} must be >= task_queries={self.queries} (the queried pairs are "
                       "among them)")
    if self.pair_count - self.queries > self._distractor_room():
      raise ValueError(f"task_pairs={self.pairs} is too many for model.seq_len={self.seq_len} with "
                       f"task_queries={self.queries}: at most {self.queries + self._distractor_room()} pairs always "
                       f"fit ({PAIR_BYTES} tokens each at byte level); lower task_pairs (or set task_pairs=none) or "
                       "raise model.seq_len")
    if self.pair_count > min(self.keys, 10 ** VALUE_DIGITS):
      raise ValueError(f"task_pairs={self.pair_count} needs as many distinct keys and values: at most "
                       f"min(task_keys={self.keys}, {10 ** VALUE_DIGITS}); lower task_pairs or raise task_keys")

  def _validate_chains(self) -> None:
    room = 1 + self._chain_room() // (self.hops + 1)
    if self.chain_count > room:
      raise ValueError(f"task_chains={self.chains} is too many for model.seq_len={self.seq_len} with "
                       f"task_hops={self.hops}: at most {room} chains of {self.hops + 1} assignments always fit "
                       f"({ASSIGN_BYTES} tokens each at byte level); lower task_chains (or set task_chains=none) or "
                       "raise model.seq_len")
    if self.chain_count * (self.hops + 1) > self.keys:
      raise ValueError(f"task_chains x (task_hops + 1) = {self.chain_count * (self.hops + 1)} names exceed "
                       f"task_keys={self.keys}; raise task_keys or lower task_chains")
