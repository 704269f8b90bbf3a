"""The on-device decode loop of ``generate``: same tokens as a step-by-step loop, cache in place.

``generate(use_cache=True)`` runs the prefill and every decode step in one jitted call
(``generate._cached_decode``: a ``lax.fori_loop`` whose carry holds the KV cache). These tests
check it against the step-by-step loop it replaced (``generate._cached_step`` driven from Python,
one ``jax.random.split`` per token, ``eos_id`` sticking), with dense weights and with 4-bit
weights through the C++ CPU kernel (an FFI custom call inside the loop), and read the compiled
loop body to check that a token writes only its own keys and values into the cache (no copy of
a layer's slab, no re-stacking of the whole cache).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny
from compressjax import generate as gen
from compressjax import transforms
from compressjax.io import build_model, model_params
from compressjax.model import init_cache


def _stepwise(model, prompt, n, temperature=0.0, seed=0, eos_id=None):
  """The pre-loop ``generate``: one jitted step per token, driven from Python."""
  prompt = np.asarray(prompt, np.int32)
  graphdef, state = nnx.split(model)
  flat, state_def = jax.tree.flatten(state)
  step = gen._cached_step(graphdef, state_def, float(temperature))
  cache = init_cache(model.cfg, prompt.shape[0], prompt.shape[1] + n)
  key = jax.random.key(seed)
  done = np.zeros((prompt.shape[0],), bool)
  out = []
  toks = jnp.asarray(prompt)
  for _ in range(n):
    key, sub = jax.random.split(key)
    tok, cache = step(flat, toks, cache, sub)
    tok = np.asarray(tok)
    if eos_id is not None:
      tok = np.where(done, eos_id, tok)
      done |= tok == eos_id
    out.append(tok)
    toks = jnp.asarray(tok)[:, None]
  return np.stack(out, axis=1)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_loop_equals_stepwise_dense(temperature):
  model = tiny.tiny_model(seed=11)
  prompt = np.random.default_rng(3).integers(0, 300, (2, 6))
  got = gen.generate(model, prompt, 10, temperature=temperature, seed=4)
  np.testing.assert_array_equal(got, _stepwise(model, prompt, 10, temperature, seed=4))


def test_loop_equals_stepwise_with_eos():
  model = tiny.tiny_model(seed=12)
  prompt = np.random.default_rng(5).integers(0, 300, (2, 4))
  free = gen.generate(model, prompt, 9)
  eos = int(free[0, 3])
  got = gen.generate(model, prompt, 9, eos_id=eos)
  np.testing.assert_array_equal(got, _stepwise(model, prompt, 9, eos_id=eos))
  assert (got[0, 3:] == eos).all()


def test_loop_equals_stepwise_cpu_kernel():
  """4-bit leaves through the C++ kernel (``matmul_implementation="cpu"``) inside the loop."""
  model = tiny.tiny_model(seed=13)
  qparams, _ = transforms.apply(transforms.rtn(bits=4, group_size=32), model_params(model))
  import dataclasses  # pylint: disable=g-import-not-at-top
  qmodel = build_model(dataclasses.replace(model.cfg, matmul_implementation="cpu"), qparams)
  prompt = np.random.default_rng(6).integers(0, 300, (1, 5))
  got = gen.generate(qmodel, prompt, 8)
  np.testing.assert_array_equal(got, _stepwise(qmodel, prompt, 8))
  # The kernel really is in the compiled loop (not silently the XLA path).
  graphdef, state = nnx.split(qmodel)
  flat, state_def = jax.tree.flatten(state)
  txt = gen._cached_decode(graphdef, state_def, 0.0, 8, None).lower(
      flat, jnp.asarray(prompt, jnp.int32), jax.random.key(0)).as_text()
  assert "cj_quant_gemv" in txt


def _computations(hlo: str) -> dict[str, str]:
  comps = {}
  for m in re.finditer(r"^(?:ENTRY )?(%[\w.\-]+) .*?\{\n(.*?)^\}", hlo, re.S | re.M):
    comps[m.group(1)] = m.group(2)
  return comps


def test_loop_body_writes_cache_in_place():
  model = tiny.tiny_model(seed=14)
  cfg = model.cfg
  prompt_len, n = 5, 8
  graphdef, state = nnx.split(model)
  flat, state_def = jax.tree.flatten(state)
  hlo = gen._cached_decode(graphdef, state_def, 0.0, n, None).lower(
      flat, jnp.zeros((1, prompt_len), jnp.int32), jax.random.key(0)).compile().as_text()
  comps = _computations(hlo)
  bodies = re.findall(r"while\(.*?body=(%[\w.\-]+)", hlo)
  assert len(bodies) == 1, bodies
  body = comps[bodies[0]]
  dims = (cfg.num_layers, 1, prompt_len + n, cfg.num_kv_heads, cfg.head_dim)
  full = "f32[" + ",".join(map(str, dims)) + "]"
  slab = "f32[" + ",".join(map(str, dims[1:])) + "]"
  slab1 = "f32[" + ",".join(map(str, (1,) + dims[1:])) + "]"
  writers = []
  for line in body.splitlines():
    m = re.match(r"\s*(?:ROOT )?%\S+ = (\S+?)\{[^}]*\} (\S+?)\((.*)", line)
    if not m:
      continue
    shape, op, rest = m.groups()
    if shape in (slab, slab1):
      assert op not in ("copy", "concatenate"), f"a layer's cache slab is copied: {line.strip()}"
    if shape == full and op not in ("get-tuple-element", "parameter", "bitcast"):
      writers.append((op, rest))
  # Per layer one key and one value write; each is a fusion whose root updates a slice in place.
  assert len(writers) == 2 * cfg.num_layers, writers
  for op, rest in writers:
    assert op == "fusion", (op, rest)
    called = re.search(r"calls=(%[\w.\-]+)", rest).group(1)
    root = [l for l in comps[called].splitlines() if "ROOT" in l][0]
    assert " dynamic-update-slice(" in root, root


def test_tied_head_reads_the_embedding_without_a_transposed_copy():
  """At one row ``h @ E.T`` compiled to a loop fusion over a transposed copy of ``E``."""
  model = tiny.tiny_model(seed=15)
  cfg = model.cfg
  graphdef, state = nnx.split(model)
  flat, state_def = jax.tree.flatten(state)
  hlo = gen._cached_decode(graphdef, state_def, 0.0, 4, None).lower(
      flat, jnp.zeros((1, 3), jnp.int32), jax.random.key(0)).compile().as_text()
  transposed = f"f32[{cfg.hidden_size},{cfg.vocab_size}]"
  assert transposed not in hlo, [l for l in hlo.splitlines() if transposed in l][:3]
  h = jnp.asarray(np.random.default_rng(0).standard_normal((2, 1, cfg.hidden_size)), jnp.float32)
  emb = model.embed.embedding.get_value()
  np.testing.assert_allclose(model.logits(h), np.asarray(h) @ np.asarray(emb).T, rtol=1e-5,
                             atol=1e-5)


def test_attention_bounded_to_the_filled_prefix(monkeypatch):
  """With ``ATTEND_MIN = 4`` a 22-position cache is attended over 4, 16 or 22 positions
  (``lax.switch``); logits match the full forward and tokens the no-cache path."""
  from compressjax import model as M  # pylint: disable=g-import-not-at-top
  assert M._attend_bounds(22) == (22,)
  monkeypatch.setattr(M, "ATTEND_MIN", 4)
  assert M._attend_bounds(22) == (4, 16, 22) and M._attend_bounds(16) == (4, 16)
  gen._cached_decode.cache_clear()
  gen._cached_step.cache_clear()
  try:
    model = tiny.tiny_model(seed=16)
    toks = jnp.asarray(np.random.default_rng(7).integers(0, 300, (2, 20)), jnp.int32)
    full = model(toks)
    cache = init_cache(model.cfg, 2, 22)
    parts = []
    for a, b in ((0, 3), (3, 4), (4, 5), (5, 17), (17, 18), (18, 20)):  # crosses 4 and 16
      logits, cache = model(toks[:, a:b], cache)
      parts.append(logits)
    np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full, atol=2e-5, rtol=1e-5)
    prompt = np.asarray(toks[:, :3])
    got = gen.generate(model, prompt, 19)  # cache of 22: every bound is used
    np.testing.assert_array_equal(got, gen.generate(model, prompt, 19, use_cache=False))
    graphdef, state = nnx.split(model)
    flat, state_def = jax.tree.flatten(state)
    hlo = gen._cached_decode(graphdef, state_def, 0.0, 19, None).lower(
        flat, jnp.asarray(prompt), jax.random.key(0)).as_text()
    assert "stablehlo.case" in hlo
  finally:
    gen._cached_decode.cache_clear()
    gen._cached_step.cache_clear()
