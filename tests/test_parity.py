"""Parity of the real reference model (SmolLM2-135M-Instruct, GGUF Q4_1) with transformers.

GGUF -> ours -> ``save_hf`` -> ``transformers.LlamaForCausalLM`` (PyTorch, CPU, float32): the
logits on real text must agree, ``load_hf`` must give back exactly the GGUF-loaded parameters, and
greedy generation must not depend on the KV cache (nor differ from transformers' own greedy
decoding; marked ``slow``: run with ``pytest -m slow``). The model is loaded once per module.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from compressjax import data
from compressjax.generate import generate
from compressjax.io import build_model, load_hf, model_params, save_hf
from compressjax.io.gguf import load_gguf
from conftest import require, require_reference_model

# Fail, never skip, when what these tests need is missing (CI installs all of it).
torch = require("torch")
transformers = require("transformers")

# Measured on CPU: max |logit diff| ~1.4e-4 for logits of magnitude ~40 (float32 summation order).
LOGIT_ATOL = 1e-3
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  cfg, params, tok = load_gguf(require_reference_model())
  hf_dir = save_hf(tmp_path_factory.mktemp("hf") / "smollm2", cfg, params, tok)
  return cfg, params, tok, build_model(cfg, params), hf_dir


@pytest.fixture(scope="module")
def torch_model(reference):
  transformers.utils.logging.disable_progress_bar()
  model = transformers.LlamaForCausalLM.from_pretrained(reference[4], dtype=torch.float32)
  return model.eval()


def test_logits_match_transformers(reference, torch_model):
  _, _, tok, model, _ = reference
  windows = data.protocol_eval_windows(tok, "wiki", seq_len=128, num_windows=2)
  ours = np.asarray(jax.jit(lambda m, t: m(t))(model, jnp.asarray(windows)))
  with torch.inference_mode():
    theirs = torch_model(torch.as_tensor(windows.astype(np.int64))).logits.numpy()
  diff = np.abs(ours - theirs)
  print(f"max |logit diff| = {diff.max():.3g} (max |logit| {np.abs(theirs).max():.3g}, "
        f"mean diff {diff.mean():.3g})")
  assert diff.max() < LOGIT_ATOL
  assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.99


def test_gguf_hf_ours_round_trip_is_exact(reference):
  cfg, params, _, model, hf_dir = reference
  cfg2, params2, tok2 = load_hf(hf_dir)
  assert cfg2 == cfg
  assert tok2 is not None
  flat = jax.tree_util.tree_leaves_with_path
  want = {jax.tree_util.keystr(k): v for k, v in flat(params)}
  got = {jax.tree_util.keystr(k): v for k, v in flat(params2)}
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == np.float32
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # and the built model carries those arrays
  built = {jax.tree_util.keystr(k): v for k, v in flat(model_params(model))}
  for k in want:
    np.testing.assert_array_equal(np.asarray(built[k]), want[k], err_msg=k)


@pytest.mark.slow  # ~45 s on 2 CPU cores, nearly all XLA compilation of generate's two paths
def test_greedy_generation_cache_equals_recompute(reference, torch_model):
  _, _, tok, model, _ = reference
  prompt = data.encode(tok, "The history of the city begins in the Middle Ages, when")
  cached = generate(model, prompt, NEW_TOKENS, use_cache=True)
  recomputed = generate(model, prompt, NEW_TOKENS, use_cache=False)
  print("greedy:", repr(tok.decode(cached.tolist())))
  np.testing.assert_array_equal(cached, recomputed)
  # transformers' own greedy decoding (its KV cache, its kernels) agrees.
  with torch.inference_mode():
    ref = torch_model.generate(torch.as_tensor(prompt[None].astype(np.int64)), do_sample=False,
                               max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                               pad_token_id=0, eos_token_id=None)
  np.testing.assert_array_equal(ref[0, len(prompt):].numpy(), cached)
