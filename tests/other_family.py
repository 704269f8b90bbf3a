"""A GPT-2-style model of another family for the calibration engine's tests.

Pre-LayerNorm blocks (LayerNorm with bias), a fused QKV projection ``attn/c_attn`` ``(D, 3D)``,
learned position embeddings, a GELU MLP (``mlp/c_fc``, ``mlp/c_proj``), biases on every linear
and a head tied to the token embedding: nothing of it is Llama's. :class:`Gpt2Blocks` is its
:class:`compressjax.blocks.BlockModel`; the model itself is the pure function :func:`logits`
over a nested parameter tree whose kernels may be compressed leaves.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import formats
from compressjax.blocks import BlockModel, materialize, to_abstract_tree, unflatten
from compressjax.transforms.awq import AwqGroup
from compressjax.transforms.selection import leaves_with_paths

# Every linear kernel of the blocks (the ``where`` of the transforms; Llama's is the default).
LINEARS = r"blocks/\d+/(attn|mlp)/c_\w+/kernel"
BLOCK = r"blocks/\d+/"


def init_params(seed: int = 0, *, vocab: int = 300, d: int = 64, heads: int = 4, layers: int = 2,
                max_len: int = 64) -> dict[str, Any]:
  rng = np.random.default_rng(seed)
  f32 = lambda *s, scale=0.02: jnp.asarray(scale * rng.standard_normal(s), jnp.float32)
  # A few outlier channels in every LayerNorm's output, as trained LLMs have (what AWQ exploits).
  outliers = np.where(np.arange(d) % 16 == 3, 8.0, 1.0)
  ln = lambda: {"scale": jnp.asarray(outliers * (1 + 0.1 * rng.standard_normal(d)), jnp.float32),
                "bias": f32(d)}
  lin = lambda i, o: {"kernel": f32(i, o, scale=i ** -0.5), "bias": f32(o)}
  blocks = [{"ln_1": ln(), "attn": {"c_attn": lin(d, 3 * d), "c_proj": lin(d, d)},
             "ln_2": ln(), "mlp": {"c_fc": lin(d, 4 * d), "c_proj": lin(4 * d, d)}}
            for _ in range(layers)]
  return {"wte": f32(vocab, d, scale=1.0), "wpe": f32(max_len, d, scale=0.1), "blocks": blocks,
          "ln_f": ln(), "num_heads": heads}


def _layer_norm(p, x, eps=1e-5):
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _linear(p, x):
  return formats.dot(x, p["kernel"]) + p["bias"]


def block_apply(p: Mapping[str, Any], x: jax.Array, heads: int, capture=None) -> jax.Array:
  """One block on a nested parameter dict; ``capture`` receives every linear's input."""
  b, t, d = x.shape
  h = _layer_norm(p["ln_1"], x)
  if capture is not None:
    capture["attn_in"] = h
  q, k, v = jnp.split(_linear(p["attn"]["c_attn"], h), 3, axis=-1)
  split = lambda a: a.reshape(b, t, heads, d // heads)
  s = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(d // heads)
  s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
  a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), split(v)).reshape(b, t, d)
  if capture is not None:
    capture["attn_out"] = a
  x = x + _linear(p["attn"]["c_proj"], a)
  h = _layer_norm(p["ln_2"], x)
  if capture is not None:
    capture["mlp_in"] = h
  m = jax.nn.gelu(_linear(p["mlp"]["c_fc"], h))
  if capture is not None:
    capture["mlp_act"] = m
  return x + _linear(p["mlp"]["c_proj"], m)


def logits(params: Mapping[str, Any], tokens: jax.Array) -> jax.Array:
  x = params["wte"][tokens] + params["wpe"][: tokens.shape[1]]
  for p in params["blocks"]:
    x = block_apply(p, x, params["num_heads"])
  return _layer_norm(params["ln_f"], x) @ params["wte"].T


class Gpt2Blocks(BlockModel):
  """The engine's view of the GPT-2-style model (``num_heads`` is static, not a weight)."""

  linear_inputs = {"attn/c_attn/kernel": "attn_in", "attn/c_proj/kernel": "attn_out",
                   "mlp/c_fc/kernel": "mlp_in", "mlp/c_proj/kernel": "mlp_act"}

  def __init__(self, params):
    self.heads = params["num_heads"]
    self.params = {k: v for k, v in params.items() if k != "num_heads"}
    self.num_blocks = len(self.params["blocks"])

  def abstract_params(self):
    return to_abstract_tree(self.params)

  def block_prefix(self, i):
    return f"blocks/{i}/"

  def block_params(self, i):
    return dict(leaves_with_paths(materialize(self.params["blocks"][i])))

  def outside_params(self):
    return dict(leaves_with_paths(materialize(
        {k: v for k, v in self.params.items() if k != "blocks"})))

  def embed(self, outside, tokens):
    return outside["wte"][tokens] + outside["wpe"][: tokens.shape[1]]

  def apply_block(self, block, x, capture=None):
    return block_apply(unflatten(block), x, self.heads, capture)


def awq_groups(p: str, paths: set[str], shapes) -> list[AwqGroup]:
  """AWQ's scaling groups of a GPT-2 block: the fused QKV after ln_1, c_fc after ln_2 (the
  LayerNorm's scale and bias are divided by the input scale). The GELU before ``mlp/c_proj``
  and the fused v slice before ``attn/c_proj`` leave nothing to fold into for those two."""
  del shapes
  out = [AwqGroup(p + "qkv", (p + "attn/c_attn/kernel",), p + "ln_1/scale", "norm"),
         AwqGroup(p + "fc", (p + "mlp/c_fc/kernel",), p + "ln_2/scale", "norm")]
  return [g for g in out if all(l in paths for l in g.linears)]
