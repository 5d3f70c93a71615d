"""The run configuration: a ``TrainConfig`` holding a ``ModelConfig``, overrides, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import types
import typing
from typing import Any

from configs.tasks import TaskSpec
from fibjax.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run needs besides the workdir. ``batch_size`` is global sequences per step."""

  model: ModelConfig = ModelConfig()
  data_path: str | None = None  # None: the embedded corpus; else a .txt/.jsonl file or a folder of them
  tokenizer: str = "byte"  # "byte" (vocab 256) or "bpe" (trained locally with `tokenizers`)
  bpe_vocab_size: int = 4096
  batch_size: int = 16
  grad_accum: int = 1
  steps: int = 300
  lr: float = 3e-3
  warmup_steps: int = 30
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 4
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  mesh_data: int = -1  # -1: all devices not used by fsdp
  mesh_fsdp: int = 1
  final_eval_multiples: tuple[int, ...] = (1, 2, 4)
  final_eval_tokens: int = 32768
  position_buckets: int = 8
  progress: bool = True
  # pack_documents: each window's documents (each starts at a SEPARATOR token) attend only within
  # themselves, and RoPE positions restart at 0 at each separator (a window's leading tokens,
  # the tail of a document begun before it, count from 0 at the window's start); training,
  # periodic and final evaluation alike. False: one causal sequence per window, positions 0..T-1.
  pack_documents: bool = False
  # deterministic: XLA's deterministic GPU algorithms (train.run.xla_flags.DETERMINISTIC), so a
  # rerun of the same seed on the same GPU type repeats the loss curve bit for bit.
  deterministic: bool = False
  # Synthetic long-range tasks (configs.tasks, train.data.tasks): task None trains on text alone;
  # "mqar", "passkey" or "vartrack" makes each training row a task sequence with probability
  # task_mix (1.0: the task alone), else a text window; only a task row's answer tokens count in
  # its loss. Held-out evaluation stays on text. The task_* settings are TaskSpec's fields.
  task: str | None = None
  task_mix: float = 1.0
  task_distance: str = "uniform"  # "uniform", "uniform:LO:HI" or "grid:D1,D2,..." (tokens)
  task_pairs: int | None = None  # mqar: pairs in the context (None: as many as always fit)
  task_queries: int = 4  # mqar: pairs asked for
  task_hops: int = 2  # vartrack: variable-to-variable assignments of a chain after its first
  task_chains: int | None = None  # vartrack: chains, one queried (None: as many as always fit)
  task_keys: int = 4096  # the key vocabulary (mqar keys, vartrack names): 1000..343000 words

  def validate(self) -> "TrainConfig":
    """Raises ``ValueError`` naming the bad field, its value and what it accepts; returns self."""
    self._validate_numbers()
    self.model.validate()
    _check(self, "pack_documents", isinstance(self.pack_documents, bool), "a bool (true/false)")
    _check(self, "deterministic", isinstance(self.deterministic, bool), "a bool (true/false)")
    if self.model.eval_window is not None:
      raise ValueError(f"model.eval_window={self.model.eval_window} is an evaluation of a dense run (python -m "
                       "train.evaluate --sink-window), not something to train with: drop it")
    if self.tokenizer not in ("byte", "bpe"):
      raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {self.tokenizer!r}")
    if self.tokenizer == "byte" and self.model.vocab_size != 256:
      raise ValueError(f"model.vocab_size must be 256 with the byte tokenizer, got {self.model.vocab_size}: set "
                       "model.vocab_size=256")
    if self.tokenizer == "bpe" and self.model.vocab_size != self.bpe_vocab_size:
      # a prepared corpus fixes the vocabulary: train.data.prepare prints both overrides (data.prepared_overrides)
      raise ValueError(f"model.vocab_size ({self.model.vocab_size}) must equal bpe_vocab_size ({self.bpe_vocab_size}) "
                       f"with the BPE tokenizer: add model.vocab_size={self.bpe_vocab_size} (for a corpus from "
                       "python -m train.prepare, the bpe_vocab_size=V model.vocab_size=V it printed)")
    if self.batch_size % self.grad_accum:
      raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
    self._validate_task()
    if self.data_path is not None and not pathlib.Path(self.data_path).exists():
      raise ValueError(f"data_path {self.data_path!r} does not exist: give a .txt/.jsonl file or folder, or drop it "
                       "to train on the embedded corpus")
    return self

  def lacking_on(self, backend: str) -> list[str]:
    """The ``model.*_impl`` fields whose implementation ``backend`` (``jax.default_backend()`` or
    ``"cpu"``/``"gpu"``) cannot run: cuDNN off a GPU, a Pallas kernel on a CPU without
    ``model.interpret``."""
    impls = {name: getattr(self.model, name) for name in ("attention_impl", "decode_impl", "norm_impl")}
    pallas_lacking = backend == "cpu" and not self.model.interpret
    return [name for name, impl in impls.items()
            if (impl == "cudnn" and backend != "gpu") or (impl == "pallas" and pallas_lacking)]

  def check_backend(self, backend: str) -> "TrainConfig":
    """Raises ``ValueError`` naming the first of ``lacking_on(backend)`` and the ``--set`` that
    replaces it. Checked before a run writes anything; returns self."""
    for name in self.lacking_on(backend):
      impl = getattr(self.model, name)
      # a kernel family names Pallas kernels: leaving Pallas drops it too, else validate refuses the fix
      fix = f"--set model.{name}=xla" + (" model.attention_kernels=null"
                                         if name == "attention_impl" and self.model.attention_kernels else "")
      interpret = ", or add model.interpret=true to interpret the Pallas kernels (slow)" if impl == "pallas" else ""
      raise ValueError(f"model.{name}={impl} needs a GPU (the backend here is {backend}); use {fix}{interpret}")
    return self

  def on_backend(self, backend: str) -> "TrainConfig":
    """This config with each of ``lacking_on(backend)`` set to ``auto`` (and the kernel family
    dropped with a Pallas attention): the same model on implementations ``backend`` runs, for
    reading a trained run elsewhere (a GPU run probed on a CPU). Returns self when none lacks."""
    lacking = self.lacking_on(backend)
    if not lacking:
      return self
    changes: dict[str, Any] = {name: "auto" for name in lacking}
    if "attention_impl" in lacking:
      changes["attention_kernels"] = None
    return dataclasses.replace(self, model=dataclasses.replace(self.model, **changes))

  def task_spec(self) -> TaskSpec | None:
    """The run's task (``None``: text alone), not yet validated."""
    if self.task is None:
      return None
    return TaskSpec(self.task, self.model.seq_len, self.task_distance, self.task_pairs, self.task_queries,
                    self.task_hops, self.task_chains, self.task_keys)

  def _validate_task(self) -> None:
    """``task_mix`` in (0, 1] with a task, and the task's settings (``TaskSpec.validate``)."""
    if self.task is None:
      if self.task_mix != 1.0:
        raise ValueError(f"task_mix={self.task_mix} mixes a task into the text, but no task is set: add "
                         "task=mqar, task=passkey or task=vartrack")
      for f in dataclasses.fields(self):
        if f.name.startswith("task_") and getattr(self, f.name) != f.default:
          raise ValueError(f"{f.name}={getattr(self, f.name)} is a task setting, but no task is set (text alone): add "
                           f"task=mqar, task=passkey or task=vartrack, or set {f.name}={f.default} (its default)")
      return
    _check(self, "task_mix", isinstance(self.task_mix, (int, float)) and 0 < self.task_mix <= 1,
           "in (0, 1]: the fraction of rows that are task sequences (task=none for text alone)")
    self.task_spec().validate()

  def _validate_numbers(self) -> None:
    """The training fields' ranges, and the model's sequence length against what evaluation needs."""
    for name in INT_FIELDS:
      _check(self, name, isinstance(getattr(self, name), int) and getattr(self, name) >= 1, "an int >= 1")
    _check(self, "warmup_steps", self.warmup_steps >= 0, "an int >= 0")
    _check(self, "seed", isinstance(self.seed, int) and 0 <= self.seed < 2**32, "an int in [0, 2**32)")
    _check(self, "lr", math.isfinite(self.lr) and self.lr > 0, "a finite number > 0 (e.g. 3e-3)")
    _check(self, "grad_clip", self.grad_clip > 0, "> 0 (math.inf: no clipping)")
    _check(self, "min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
    _check(self, "weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0")
    for name in ("b1", "b2"):
      _check(self, name, 0 <= getattr(self, name) < 1, "in [0, 1)")
    _check(self, "final_eval_multiples", bool(self.final_eval_multiples) and min(self.final_eval_multiples) >= 1,
           "one or more ints >= 1, e.g. 1,2,4")
    if self.model.seq_len < max(2, self.position_buckets):
      raise ValueError(f"model.seq_len must be >= 2 and >= position_buckets ({self.position_buckets}): loss by "
                       f"position needs a position per bucket, got model.seq_len={self.model.seq_len}")
    if self.tokenizer == "bpe" and self.bpe_vocab_size <= 256:
      raise ValueError(f"bpe_vocab_size must be > 256 (the byte alphabet plus merges), got {self.bpe_vocab_size}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
    d = dict(d)
    model = ModelConfig(**d.pop("model"))
    d["final_eval_multiples"] = tuple(d.get("final_eval_multiples", (1, 2, 4)))
    return cls(model=model, **d)

  def save(self, path: pathlib.Path) -> None:
    path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

  @classmethod
  def load(cls, path: pathlib.Path) -> "TrainConfig":
    """Reads a saved config; raises ``ValueError`` if the file is not one."""
    try:
      return cls.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
      raise ValueError(f"{path} is not a fibjax config ({type(e).__name__}: {e}); use a new --workdir") from e


INT_FIELDS = ("batch_size", "grad_accum", "steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
              "keep_checkpoints", "final_eval_tokens", "position_buckets")


def _check(cfg: TrainConfig, name: str, ok: bool, accepted: str) -> None:
  if not ok:
    raise ValueError(f"{name} must be {accepted}, got {getattr(cfg, name)!r}")


def _coerce(value: str, annotation: Any, field: str) -> Any:
  hint = typing.get_type_hints(TrainConfig).get(field) if "." not in field else None
  kind = annotation if hint is None else hint
  origin = typing.get_origin(kind)
  args = typing.get_args(kind)
  if origin in (typing.Union, types.UnionType):
    if value.lower() in ("none", "null"):
      return None
    kind = next(a for a in args if a is not type(None))
    origin, args = typing.get_origin(kind), typing.get_args(kind)
  if origin is tuple:
    try:
      return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError as e:
      raise ValueError(f"{field}={value!r}: expected comma-separated integers, e.g. {field}=1,2,4") from e
  if kind is bool:
    if value.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{field} takes true/false, got {value!r}")
    return value.lower() in ("true", "1")
  try:
    return kind(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{field}={value!r}: expected {getattr(kind, '__name__', kind)}") from e


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
  """Applies ``key=value`` strings (``model.window=32``, ``steps=100``) to a config."""
  model_hints = typing.get_type_hints(ModelConfig)
  train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
  model_changes, train_changes = {}, {}
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"override {item!r} must look like key=value (e.g. steps=100 or model.window=32)")
    key, value = item.split("=", 1)
    if key.startswith("model."):
      name = key[len("model."):]
      if name not in model_hints:
        raise ValueError(f"unknown model field {name!r}; known: {sorted(model_hints)}")
      model_changes[name] = _coerce(value, model_hints[name], key)
    elif key in train_fields:
      train_changes[key] = _coerce(value, None, key)
    else:
      raise ValueError(f"unknown config field {key!r}; known: {sorted(train_fields)} and model.<field>")
  model = dataclasses.replace(cfg.model, **model_changes)
  return dataclasses.replace(cfg, model=model, **train_changes)


def resolve_random_offsets(cfg: TrainConfig) -> TrainConfig:
  """For a ``*-random`` variant: ``model.offset_seed = cfg.seed`` and ``model.random_offsets`` the
  offsets drawn from it, so the saved ``config.json`` holds them exactly (``ModelConfig.with_random_offsets``;
  idempotent: a resumed run's saved config comes back equal). Other variants: ``cfg`` unchanged."""
  return dataclasses.replace(cfg, model=cfg.model.with_random_offsets(cfg.seed))
