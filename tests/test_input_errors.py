"""Bad input as a user gives it: each command line refuses in one ``error:`` line (exit code 2)
that names the problem and the fix, before any work and without writing anything; a bad model
field is one ``ValueError`` naming it. CPU only."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fibjax
from fibjax.layers import LayerPattern
from fibjax.model import LM, ModelConfig
from train.data import text as data, prepare

ROOT = pathlib.Path(__file__).resolve().parents[1]
DECODE_RESULTS = ROOT / "benchmarks" / "results" / "decode_NVIDIA_H200.json"  # another benchmark's results


def _cli(module: str, *argv: str) -> str:
  """Runs ``python -m module argv`` on the CPU backend; asserts the one-line refusal and returns it."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=env)
  err = res.stderr.strip().splitlines()
  assert res.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), (res.returncode, res.stderr[-2000:])
  assert res.stdout == "", res.stdout[-2000:]
  return err[0]


@pytest.fixture
def text_file(tmp_path) -> pathlib.Path:
  path = tmp_path / "a.txt"
  path.write_text("hello world, a little text to tokenize\n" * 4)
  return path


@pytest.mark.parametrize("size", ["-5", "100", "256", "65537"])
def test_prepare_refuses_a_bpe_vocabulary_out_of_range(tmp_path, text_file, size):
  out = tmp_path / "out"
  line = _cli("train.data.prepare", "--data", str(text_file), "--out", str(out), "--tokenizer", "bpe",
              "--bpe-vocab-size", size)
  assert "--bpe-vocab-size" in line and "257..65536" in line and size in line
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # neither out nor out.partial


@pytest.mark.parametrize("argv, flag", [(["--seq-len", "64"], "--window"), (["--seq-len", "0"], "--seq-len"),
                                        (["--window", "100000"], "--window")])
def test_fibjax_refuses_bad_arguments_before_printing(argv, flag):
  assert flag in _cli("fibjax", *argv)


def test_attention_rewrite_refuses_what_is_not_its_results(tmp_path):
  not_json, a_list = tmp_path / "notes.json", tmp_path / "list.json"
  not_json.write_text("not json at all\n")
  a_list.write_text("[1, 2]\n")
  for path in (not_json, a_list, DECODE_RESULTS):
    line = _cli("benchmarks.attention", "--rewrite", str(path), "--out", str(tmp_path / "out"))
    assert f"{path} is not a benchmarks.attention results file" in line
  assert not (tmp_path / "out").exists()


def test_attention_refuses_an_out_that_is_a_file(tmp_path):
  committed = ROOT / "benchmarks" / "results" / "attention_NVIDIA_H200_33f78e0.json"
  out = tmp_path / "out"
  out.write_text("keep me\n")
  line = _cli("benchmarks.attention", "--rewrite", str(committed), "--out", str(out))
  assert f"--out {out} is a file; give a folder" in line
  assert out.read_text() == "keep me\n"


@pytest.mark.parametrize("base", [0, -1.0, float("inf"), float("nan")])
def test_model_config_refuses_a_bad_rope_base(base):
  with pytest.raises(ValueError, match="rope_base") as e:
    ModelConfig(rope_base=base).validate()
  assert "> 0" in str(e.value)
  ModelConfig(rope_base=500_000.0).validate()


@pytest.mark.parametrize("fields, given", [({"seq_len": 64, "window": 128}, "reach (None: seq_len=64)"),
                                           ({"seq_len": 64, "window": 16, "reach": 16}, "reach=16")])
def test_model_config_names_the_window_when_it_reaches_past_the_offsets(fields, given):
  with pytest.raises(ValueError) as e:
    ModelConfig(variant="fib-linear", **fields).validate()
  assert str(e.value) == (f"window must be < reach (offsets live in [window, reach)), got window={fields['window']} "
                          f"and {given}: lower window or raise reach")
  ModelConfig(variant="dense", seq_len=64, window=128).validate()  # dense has no offsets to place


@pytest.mark.parametrize("variant", ["fib-fixed", "pow2-fixed"])
def test_a_sparse_variant_without_an_offset_in_any_layer_is_refused(variant):
  """At W = 100 and T = 128 fixed alpha leaves no offset in [W, R): the run would be ``window`` renamed."""
  with pytest.raises(ValueError, match=rf"variant '{variant}' has no offset in \[window, reach\) = \[100, 128\) in any "
                                       r"layer, so it would train as variant 'window'.*use variant 'window'"):
    ModelConfig(variant=variant, seq_len=128, window=100).validate()
  ModelConfig(variant="window", seq_len=128, window=100).validate()
  ModelConfig(variant="fib-random", seq_len=128, window=100).validate()  # a random draw in [100, 128) is an offset


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN runs here")
@pytest.mark.parametrize("call", ["dense_attention", "model"])
def test_cudnn_without_a_gpu_is_a_value_error_naming_the_fix(call):
  q = jnp.zeros((1, 16, 2, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"implementation='cudnn' needs a GPU \(the default backend is cpu\); use "
                                       r"implementation='auto' or 'xla'"):
    if call == "dense_attention":
      fibjax.dense_attention(q, q, q, implementation="cudnn")
    else:
      cfg = ModelConfig(variant="dense", vocab_size=32, d_model=16, num_layers=1, num_heads=2, head_dim=8, mlp_dim=32,
                        seq_len=16, attention_impl="cudnn")
      LM(cfg, rngs=nnx.Rngs(0))(jnp.zeros((1, 16), jnp.int32))


def test_model_refuses_tokens_that_are_not_integer_ids():
  cfg = ModelConfig(variant="dense", vocab_size=32, d_model=16, num_layers=1, num_heads=2, head_dim=8, mlp_dim=32,
                    seq_len=16)
  model = LM(cfg, rngs=nnx.Rngs(0))
  for bad in (jnp.zeros((1, 16), jnp.float32), jnp.zeros((16,), jnp.int32)):
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\] integer ids in \[0, 32\), got shape"):
      model(bad)
  for bad in (jnp.full((1, 16), 32, jnp.int32), np.full((1, 16), -1, np.int32)):  # ids of another tokenizer
    with pytest.raises(ValueError, match=r"tokens must hold integer token ids in \[0, 32\) \(vocab_size\), got dtype"):
      model(bad)
  assert model(jnp.zeros((1, 16), jnp.int32)).shape == (1, 16, 32)
  assert nnx.jit(lambda m, t: m(t))(model, jnp.full((1, 16), 32, jnp.int32)).shape == (1, 16, 32)  # traced: unchecked


def _bad_files(folder: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
  """Data files each reader refuses, with a piece of the message that names the fix."""
  not_gzip = folder / "not_gzip.jsonl.gz"
  not_gzip.write_bytes(b"no")
  latin = folder / "latin.jsonl"
  latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xff"}\n')
  latin_gz = folder / "latin_gz.jsonl.gz"
  latin_gz.write_bytes(gzip.compress(latin.read_bytes()))
  cut = folder / "cut.jsonl.gz"
  whole = gzip.compress(json.dumps({"text": "some text " * 50}).encode() + b"\n")
  cut.write_bytes(whole[: len(whole) // 2])
  binary = folder / "binary.txt"
  binary.write_bytes(b"hello\0world\n")
  return {
      "not gzip": (not_gzip, "re-save it with gzip or drop the .gz suffix"),
      "not utf-8": (latin, "not UTF-8 text (byte 0xff at offset 28); re-save it as UTF-8"),
      "not utf-8 gz": (latin_gz, "not UTF-8 text (byte 0xff at offset 28 after decompression)"),
      "cut gzip": (cut, "re-save it with gzip"),
      "binary": (binary, "looks binary"),
  }


def test_load_documents_names_the_file_it_cannot_read(tmp_path):
  for path, fix in _bad_files(tmp_path).values():
    with pytest.raises(ValueError) as e:
      data.load_documents(str(path))
    assert str(e.value).startswith(str(path)) and fix in str(e.value), str(e.value)


def test_prepare_names_the_file_it_cannot_read(tmp_path):
  for name, (path, fix) in _bad_files(tmp_path).items():
    with pytest.raises(ValueError) as e:
      prepare.prepare(path, tmp_path / f"out {name}")
    assert str(e.value).startswith(str(path)) and fix in str(e.value), str(e.value)
    assert not (tmp_path / f"out {name}").exists() and not (tmp_path / f"out {name}.partial").exists()


@pytest.mark.parametrize("module", ["train.data.prepare", "train"])
def test_clis_refuse_a_file_they_cannot_read_in_one_line(tmp_path, module):
  binary, not_gzip = _bad_files(tmp_path)["binary"][0], _bad_files(tmp_path)["not gzip"][0]
  out = ["--out", str(tmp_path / "out")] if module == "train.data.prepare" else [
      "--config", "tiny", "--workdir", str(tmp_path / "out"), "--set", "steps=1"]
  assert "looks binary" in _cli(module, "--data", str(binary), *out)
  assert "not gzip data" in _cli(module, "--data", str(not_gzip), *out)
  assert not (tmp_path / "out").exists()


def test_train_refuses_a_bad_rope_base(tmp_path):
  line = _cli("train", "--config", "tiny", "--workdir", str(tmp_path / "run"), "--set", "steps=1",
              "model.rope_base=0")
  assert "rope_base" in line
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("call, message", [
    (lambda: fibjax.linear_alphas(0, 0.5, 2.0), "num_layers must be an int >= 1, got 0"),
    (lambda: fibjax.linear_alphas(3, -1.0, 2.0), "alpha_min must be a finite real number > 0, got -1.0"),
    (lambda: fibjax.linear_alphas(3, 2.0, 1.0), "alpha_max must be >= alpha_min"),
    (lambda: fibjax.layer_alphas("linear", 3, base="fibo", window=4, reach=64), "base must be one of"),
    (lambda: fibjax.layer_alphas("fixed", 3, base="fib", window=0, reach=64), "window must be an int >= 1, got 0"),
    (lambda: fibjax.random_offsets("fib", 1.0, 4, 64, 0), "alphas must be a sequence of per-layer alphas"),
    (lambda: LayerPattern("bogus", 4, 64), "kind must be 'dense', 'static' or 'learned', got 'bogus'"),
    (lambda: LayerPattern("static", 4, 64, offsets=(-3,)), "offsets must be ints >= 0"),
    (lambda: LayerPattern("learned", 4, 64, terms=(5, 8), alpha_0=-1.0), "alpha_0 must be a finite real number > 0"),
    (lambda: LayerPattern("static", 64, 64), "reach must be > window"),
])
def test_schedule_and_pattern_helpers_refuse_bad_arguments(call, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    call()


def test_schedule_helpers_take_numpy_ints_and_lists():
  assert fibjax.layer_alphas("linear", np.int64(3), base="fib", window=4, reach=64) == (0.5, 1.25, 2.0)
  assert fibjax.coprime_order([0.5, 1.0, 2.0], "fib", 4, 64) == fibjax.coprime_order((0.5, 1.0, 2.0), "fib", 4, 64)


@pytest.mark.parametrize("scale", ["a", -1.0, float("nan"), True])
def test_attention_refuses_a_bad_scale(scale):
  q = jnp.zeros((1, 16, 2, 8))
  for call in (lambda: fibjax.attention(q, q, q, window=4, offsets=[8], scale=scale, implementation="xla"),
               lambda: fibjax.dense_attention(q, q, q, scale=scale, implementation="xla")):
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0 or None"):
      call()


def test_attention_refuses_negative_offsets_given_as_an_array():
  q = jnp.zeros((1, 16, 2, 8))
  with pytest.raises(ValueError, match=re.escape("offsets must be distances >= 0 (to keys before the query), got [-5, 8]")):
    fibjax.attention(q, q, q, window=4, offsets=jnp.array([-5, 8]), implementation="xla")


def test_attention_refuses_an_unknown_kernel_option_naming_the_ones_it_takes():
  """A misspelt kernel option is one line naming the options (not Python's TypeError from deep in
  the kernels' entry point), on either implementation."""
  q = jnp.zeros((1, 16, 2, 8))
  for impl in ("xla", "pallas"):
    with pytest.raises(ValueError, match=re.escape("unknown kernel option(s) ['confg']: the Pallas kernels take "
                                                   "('config', 'config_bwd', 'backend')")):
      fibjax.attention(q, q, q, window=4, offsets=[8], implementation=impl, interpret=True, confg=None)


def test_pallas_kernels_off_a_gpu_or_under_x64_name_the_fix():
  q = jnp.zeros((1, 16, 2, 8))
  with jax.enable_x64(True):
    with pytest.raises(ValueError, match=r"do not run with jax_enable_x64 on: call them outside jax.enable_x64\(True\)"):
      fibjax.attention(q, q, q, window=4, offsets=[8], implementation="pallas", interpret=True)
  if jax.default_backend() == "gpu":
    return
  cfg = ModelConfig(variant="dense", vocab_size=32, d_model=16, num_layers=1, num_heads=2, head_dim=8, mlp_dim=32,
                    seq_len=16, norm_impl="pallas")
  with pytest.raises(ValueError, match=r"norm_impl='pallas' runs GPU kernels \(the default backend is cpu\); use "
                                       r"norm_impl='auto' or 'xla', or interpret=True"):
    LM(cfg, rngs=nnx.Rngs(0))(jnp.zeros((1, 16), jnp.int32))


def test_offsets_that_wrap_int32_or_are_not_finite_are_refused():
  q = jax.random.normal(jax.random.key(0), (1, 64, 2, 16))
  for offsets, match in (([2**32 + 20], "fit int32"), ([np.nan, 20.5], "finite"), ([np.inf], "finite")):
    with pytest.raises(ValueError, match=match):
      fibjax.attention(q, q, q, window=8, offsets=offsets, reach=48)

def test_base_sequence_refuses_an_infinite_limit():
  with pytest.raises(ValueError, match="finite"):
    fibjax.base_sequence("fib", float("inf"))

def _dense_lm():
  cfg = fibjax.ModelConfig(variant="dense", d_model=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=64, seq_len=64,
                           window=8)
  return fibjax.LM(cfg, rngs=nnx.Rngs(0))

def test_a_prompt_longer_than_a_dense_cache_or_of_another_batch_is_refused():
  m = _dense_lm()
  with pytest.raises(ValueError, match="does not fit a dense layer's cache of 4"):
    m.prefill(jnp.zeros((1, 8), jnp.int32), m.init_cache(1, 4))
  with pytest.raises(ValueError, match="holds 2 rows but the input 1"):
    m.prefill(jnp.zeros((1, 4), jnp.int32), m.init_cache(2, 8))
  _, cache = m.prefill(jnp.zeros((1, 4), jnp.int32), m.init_cache(1, 8))
  with pytest.raises(ValueError, match=r"token_B must be \[batch\]"):
    m.decode(jnp.int32(1), jnp.int32(4), cache)

def test_auto_picks_xla_under_x64_and_pallas_is_refused_there():
  from fibjax.implementation import resolve_norm, resolve_sparse
  with jax.enable_x64(True):
    assert resolve_sparse("auto", interpret=True) == "xla"
    assert resolve_norm("auto", sequence=True, interpret=True) == "xla"
    with pytest.raises(ValueError, match="norm_impl='pallas'.*jax_enable_x64"):
      resolve_norm("pallas", sequence=True, interpret=True)


def test_the_pallas_entry_point_checks_its_pattern_and_takes_a_sequence_of_offsets():
  """Refused before any kernel runs; a sequence of offsets becomes the ``[K]`` array the kernels take."""
  from pallas_kernels import gathered_offset_attention as g  # noqa: PLC0415
  from pallas_kernels.attention.ops import attention_problem  # noqa: PLC0415
  from pallas_kernels.pattern import check_pattern  # noqa: PLC0415

  q = jax.random.normal(jax.random.key(0), (1, 64, 2, 16))
  offs = fibjax.offset_set("fib", 1.0, 8, 48)
  assert attention_problem(q, q, offs, window=8, reach=48).num_offsets == len(offs)
  window, as_array = check_pattern(8, offs, 48, None)
  assert window == 8 and as_array.dtype == jnp.int32 and as_array.tolist() == list(offs)
  for kwargs, match in ((dict(window=0), "window must be an int >= 1"), (dict(window=8.5), "window must be an int"),
                        (dict(scale=-1.0), "scale must be"), (dict(reach=4), "reach must be an int > window"),
                        (dict(offsets=[-3]), "distances >= 0"),
                        (dict(backend="cuda"), r"backend must be one of \('gpu', 'tpu', 'triton', 'mosaic'\)")):
    args = dict(window=8, offsets=offs, reach=48, interpret=True) | kwargs
    with pytest.raises(ValueError, match=match):
      g(q, q, q, **args)


def test_attention_layer_checks_its_input_and_head_dim():
  pattern = fibjax.LayerPattern("static", 8, 48, offsets=(10, 20))
  layer = fibjax.Attention(32, 4, 8, pattern, rngs=nnx.Rngs(0))
  for bad in (jnp.ones((2, 64, 16)), jnp.ones((64, 32))):
    with pytest.raises(ValueError, match=r"x must be \[batch, seq, d_model=32\]"):
      layer(bad)
  with pytest.raises(ValueError, match=r"positions_BxN must be \[batch, seq\] = \(2, 64\)"):
    layer(jnp.ones((2, 64, 32)), positions_BxN=jnp.zeros((2, 32), jnp.int32))
  with pytest.raises(ValueError, match="head_dim must be an even int"):
    fibjax.Attention(32, 4, 7, pattern, rngs=nnx.Rngs(0))
  for args, match in (((32, 0, 8, pattern), "num_heads must be an int >= 1"), ((0, 4, 8, pattern), "d_model must be"),
                      ((32, 4, 8, "fib"), "pattern must be a LayerPattern")):
    with pytest.raises(ValueError, match=match):
      fibjax.Attention(*args, rngs=nnx.Rngs(0))
  q = jnp.ones((1, 0, 2, 16))  # no positions, and a list for an array
  with pytest.raises(ValueError, match=r"q must be \[batch, seq, heads, head_dim\], each at least 1"):
    fibjax.attention(q, q, q, offsets=[8], window=8, reach=48)
  with pytest.raises(ValueError, match="q, k, v must be arrays"):
    fibjax.attention([[1.0]], q, q, offsets=[8], window=8, reach=48)


def test_task_settings_without_a_task_are_refused():
  from configs import get_config  # noqa: PLC0415
  from configs.base import apply_overrides  # noqa: PLC0415

  with pytest.raises(ValueError, match=r"task_distance=grid:10 is a task setting, but no task is set .* add task=mqar"):
    apply_overrides(get_config("tiny"), ["task_distance=grid:10"]).validate()
  apply_overrides(get_config("recall128"), ["task_keys=5000"]).validate()  # with a task, its settings stand


def test_a_sweep_root_given_as_a_run_names_a_cell(tmp_path):
  from train.run import restore  # noqa: PLC0415

  (tmp_path / "sweep.json").write_text("{}")
  (tmp_path / "dense-s0").mkdir()
  (tmp_path / "dense-s0" / "config.json").write_text("{}")
  with pytest.raises(ValueError, match=r"is a sweep root, not a run: give one of its cells, e.g. .*dense-s0"):
    restore.load_run(tmp_path)


def test_the_decode_and_norm_kernel_entry_points_check_their_operands():
  """Refused before a kernel runs: out-of-bounds rows or columns would be read as garbage or NaN."""
  from pallas_kernels.decode.attention import sparse_attention  # noqa: PLC0415
  from pallas_kernels.norm.rmsnorm import norm_residual  # noqa: PLC0415

  qkv = jnp.zeros((2, 3, 2, 16), jnp.float32)
  cache = {"k": jnp.zeros((2, 49, 2, 16)), "v": jnp.zeros((2, 49, 2, 16))}
  offs = jnp.asarray([8, 13], jnp.int32)
  for bad_qkv, bad_cache, bad_offs, match in (
      (qkv[:, :2], cache, offs, r"qkv must be \[batch, 3, heads, head_dim\]"),
      (qkv, {k: v[:1] for k, v in cache.items()}, offs, r"cache must be \{'k', 'v'\} ring buffers \[batch=2"),
      (qkv, {k: v[..., :8] for k, v in cache.items()}, offs, "head_dim=16"),
      (qkv, cache, [8, 13], r"offsets must be a \[K\] array")):
    with pytest.raises(ValueError, match=match):
      sparse_attention(bad_qkv, bad_cache, bad_offs, jnp.int32(20), window=8, scale=0.25, interpret=True)
  with pytest.raises(ValueError, match=r"norm_residual takes rows x \[R, D\] and scale \[D\], got x \(10, 32\)"):
    norm_residual(jnp.ones((10, 32)), jnp.ones((16,)), 1e-6, jnp.float32, True)
