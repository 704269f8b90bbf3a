"""Structured pruning math: which MLP channels / attention heads to remove, and how to
compensate the layer that reads them. Pure functions of arrays.

Removing intermediate channel ``j`` of a SwiGLU MLP deletes column ``j`` of ``gate_proj`` and
``up_proj`` and row ``j`` of ``down_proj``; removing query head ``h`` deletes its ``head_dim``
columns of ``q_proj`` and rows of ``o_proj``. The matrices really shrink, so the smaller model
needs no sparse kernel.

Score (calibrated): the expected squared contribution of a channel to the output of the layer
that reads it, ``E[x_j^2] * ||W_out[j, :]||^2`` (``x`` the input of ``down_proj`` / ``o_proj``;
a head's score is the sum over its channels). This is the diagonal (no cross terms) of the
output error ``tr(dW^T H dW)`` the removal causes, the structured analogue of Wanda's
``|W| * ||X||``.

Compensation (optional): the kept rows ``S`` of the reading layer are refitted by least squares
on the calibration inputs, ``W'_S = argmin ||X W - X_S W'_S||^2 = W_S + H_SS^{-1} H_SR W_R`` (the
structured OBS update; ``H = X^T X``), which removes the part of the pruned channels' output that
the kept ones can express.

References:
  Ashkboos et al. 2024, SliceGPT (arXiv:2401.15024) and An et al. 2024, FLAP (arXiv:2312.11983):
  structured removal with calibrated importance and compensation; Frantar & Alistarh 2022, OBC
  (the least-squares update of the remaining weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# pylint: disable=invalid-name

__all__ = ["channel_scores", "top_channels", "top_heads", "compensate_rows"]


def channel_scores(w_out: jax.Array, sq_sum: jax.Array) -> jax.Array:
  """``(F,)`` score of each input channel ``j`` of ``w_out`` ``(F, D)``: ``sq_sum_j ||w_j||^2``."""
  return jnp.maximum(sq_sum, 0.0) * jnp.sum(jnp.square(w_out.astype(jnp.float32)), axis=1)


def top_channels(score: jax.Array, n_keep: int) -> jax.Array:
  """Indices (ascending) of the ``n_keep`` highest scores; ties go to the lower index."""
  order = jnp.argsort(-score, stable=True)
  return jnp.sort(order[:n_keep]).astype(jnp.int32)


def top_heads(score: jax.Array, *, num_heads: int, num_kv_heads: int, head_dim: int,
              keep_per_group: int) -> jax.Array:
  """Channel indices of the query heads kept: the ``keep_per_group`` best of every KV group.

  ``score`` is the ``(num_heads * head_dim,)`` channel score of ``o_proj``'s input; query head
  ``h`` reads KV head ``h // (num_heads // num_kv_heads)``, so keeping the same count in each
  group keeps the grouped-query layout valid.
  """
  g = num_heads // num_kv_heads
  if not 0 < keep_per_group <= g:
    raise ValueError(f"keep_per_group must be in [1, {g}] (query heads per KV group), got "
                     f"{keep_per_group}")
  hs = score.reshape(num_kv_heads, g, head_dim).sum(-1)  # (KV, g)
  order = jnp.argsort(-hs, axis=1, stable=True)[:, :keep_per_group]
  heads = jnp.sort(order + (jnp.arange(num_kv_heads) * g)[:, None], axis=1).reshape(-1)
  return (heads[:, None] * head_dim + jnp.arange(head_dim)[None, :]).reshape(-1).astype(jnp.int32)


def compensate_rows(W: jax.Array, H: jax.Array, keep: jax.Array, *,
                    percdamp: float = 0.01) -> jax.Array:
  """Least-squares refit of the kept rows: ``W_S + (H_SS + damp I)^{-1} H_SR W_R``.

  Args:
    W: ``(F, D)`` weight of the reading layer (rows = input channels).
    H: ``(F, F)`` ``X^T X`` of its inputs (any positive scale).
    keep: ``(F',)`` kept row indices; the others are removed.
    percdamp: ``damp = percdamp * mean(diag(H_SS))``.

  Returns:
    The ``(F', D)`` refitted rows.
  """
  F = W.shape[0]
  removed = jnp.ones((F,), bool).at[keep].set(False)
  Wf = W.astype(jnp.float32)
  Hf = H.astype(jnp.float32)
  H_SS = Hf[keep][:, keep]
  # H_SR W_R without materializing R's indices: zero the kept rows of W.
  rhs = Hf[keep] @ jnp.where(removed[:, None], Wf, 0.0)
  damp = percdamp * jnp.mean(jnp.diag(H_SS)) + jnp.finfo(jnp.float32).tiny
  delta = jax.scipy.linalg.solve(H_SS + damp * jnp.eye(H_SS.shape[0]), rhs, assume_a="pos")
  out = Wf[keep] + jnp.where(jnp.all(jnp.isfinite(delta)), delta, 0.0)
  return out.astype(W.dtype)
