"""AWQ: activation-aware per-input-channel scaling and weight clipping. Pure math on arrays.

For linear layers that share one input ``X`` (``n`` tokens, ``K`` features; e.g. q/k/v after
the attention norm), AWQ multiplies input channel ``k`` of every weight by ``s_k`` and divides
the input by ``s_k`` (folded into the preceding norm or linear), so the function is unchanged in
full precision while the salient channels (large mean ``|x_k|``) get finer quantization:
``y = (X / s) @ Q(s W)``. The scale is searched on a grid (Lin et al. 2023, Sec. 3.3)::

    s = mean|x|^alpha, normalized by sqrt(max(s) * min(s)),  alpha in {0, 1/20, ..., 19/20}

choosing the ``alpha`` with the smallest output error summed over the layers that share the
input. Then, per layer, every group's clipping range ``max|w| * (1 - i/20)``,
``i < 20 * max_shrink``, is searched to minimize that group's output error (Sec. 3.3,
``auto_clip``).

Objective. The reference measures output errors on the activations themselves (for q/k/v the
error of the whole attention block's output, for gate/up that of the MLP). Here every error is
the linear layers' own output error, computed *exactly* from the calibration second moment
``H = X^T X / n`` without keeping activations:

    ||X W - X W'||_F^2 / n = tr((W - W')^T H (W - W'))

and, for a group ``g`` of input rows, ``dW_g^T H_gg dW_g`` (the reference's per-group clip
error, which also ignores cross-group terms). ``alpha = 0`` (``s = 1``) is always a candidate,
so the chosen scale never has a larger linear-output error than plain RTN.

References:
  Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
  Acceleration", MLSys 2024, arXiv:2306.00978 (``auto_scale.py``, ``auto_clip.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from compressjax.quantize import rtn_core

# pylint: disable=invalid-name

__all__ = ["awq_scales", "fake_quantize", "output_error", "search_clip", "search_scale"]


def fake_quantize(W: jax.Array, *, bits: int, group_size: int | None, symmetric: bool,
                  scale_dtype: Any = jnp.float16) -> jax.Array:
  """RTN quantize-dequantize of a ``(K, N)`` weight (the grid the final quantizer uses)."""
  return rtn_core.quantize_rtn(W, bits=bits, group_size=group_size, symmetric=symmetric,
                               scale_dtype=scale_dtype).materialize()


def output_error(dW: jax.Array, H: jax.Array) -> jax.Array:
  """``tr(dW^T H dW)``: the mean squared output error of a weight error given ``H = X^T X / n``."""
  return jnp.sum((H @ dW) * dW)


def awq_scales(x_mean: jax.Array, alpha: jax.Array) -> jax.Array:
  """``s = x_mean^alpha / sqrt(max * min)`` (clamped at 1e-4 as the reference)."""
  s = jnp.maximum(x_mean, 1e-4)**alpha
  s = jnp.maximum(s, 1e-4)
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def search_scale(Ws: Sequence[jax.Array], H: jax.Array, x_mean: jax.Array, *, bits: int,
                 group_size: int | None, symmetric: bool, scale_dtype: Any = jnp.float16,
                 n_grid: int = 20) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Grid search of the per-input-channel scale of layers ``Ws`` (all ``(K, N_i)``) sharing ``H``.

  Returns ``(s, alpha, errors)``: the best ``(K,)`` scale, its exponent, and the summed output
  error of every grid point (``errors[0]`` is plain RTN's).
  """
  Ws = [jnp.asarray(W, jnp.float32) for W in Ws]
  H = jnp.asarray(H, jnp.float32)
  x_mean = jnp.asarray(x_mean, jnp.float32)
  alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid

  def err(alpha):
    s = awq_scales(x_mean, alpha)
    total = jnp.zeros((), jnp.float32)
    for W in Ws:
      Wq = fake_quantize(W * s[:, None], bits=bits, group_size=group_size, symmetric=symmetric,
                         scale_dtype=scale_dtype) / s[:, None]
      total = total + output_error(W - Wq, H)
    return total

  errors = jax.lax.map(err, alphas)
  best = jnp.argmin(errors)
  return awq_scales(x_mean, alphas[best]), alphas[best], errors


def search_clip(W: jax.Array, H: jax.Array, *, bits: int, group_size: int | None,
                symmetric: bool, scale_dtype: Any = jnp.float16, n_grid: int = 20,
                max_shrink: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """Per-(group, output) clipping search; returns ``(clipped W, shrink ratio (G, N))``.

  For each group ``g`` of ``group_size`` input rows and each output ``n``, the range
  ``[-m, m]`` with ``m = max|w| * (1 - i / n_grid)`` (``i < n_grid * max_shrink``) minimizing
  ``dW_g^T H_gg dW_g`` (``dW`` against the *unclipped* weight) is kept; ``i = 0`` (no clipping)
  is a candidate, so clipping never increases the per-group error.
  """
  W = jnp.asarray(W, jnp.float32)
  K, N = W.shape
  gs = K if group_size is None else group_size
  G = K // gs
  Hg = jnp.stack([jax.lax.dynamic_slice(H, (g * gs, g * gs), (gs, gs)) for g in range(G)])
  Wg = W.reshape(G, gs, N)
  absmax = jnp.max(jnp.abs(Wg), axis=1, keepdims=True)  # (G, 1, N)
  steps = jnp.arange(int(n_grid * max_shrink), dtype=jnp.float32)

  def err(i):
    m = absmax * (1.0 - i / n_grid)
    Wc = jnp.clip(Wg, -m, m).reshape(K, N)
    dW = (W - fake_quantize(Wc, bits=bits, group_size=gs, symmetric=symmetric,
                            scale_dtype=scale_dtype)).reshape(G, gs, N)
    return jnp.einsum("gan,gab,gbn->gn", dW, Hg, dW)

  errors = jax.lax.map(err, steps)  # (S, G, N)
  best = jnp.argmin(errors, axis=0)  # (G, N)
  ratio = 1.0 - steps[best] / n_grid
  m = absmax * ratio[:, None, :]
  return jnp.clip(Wg, -m, m).reshape(K, N), ratio
