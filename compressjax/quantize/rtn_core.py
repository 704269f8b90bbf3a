"""Round-to-nearest (RTN) group-wise quantization: pure math on arrays.

No trees, configs or parameter paths here (those live in the transform that
wires RTN into a model); only functions of one ``(K, N)`` weight. Groups run
along ``K``, the input dimension, as everywhere in compressjax.

Two grids, both with ``L = 2**bits - 1`` steps:

* symmetric (GPTQ convention): ``scale = 2 * absmax / L``, codes
  ``q = clip(round(w / scale) + 2**(bits-1), 0, L)``, decoding
  ``w' = scale * (q - 2**(bits-1))``. The grid is ``scale * [-2**(bits-1),
  2**(bits-1) - 1]``, one step wider on the negative side, as in GPTQ's
  ``sym=True`` quantizer (``zero = (maxq + 1) / 2``).
* asymmetric (llama.cpp ``Q4_1`` min form): ``scale = (max - min) / L``,
  ``zero = min`` (a float offset in the weight domain), codes
  ``q = clip(round((w - zero) / scale), 0, L)``, decoding
  ``w' = scale * q + zero``.

Codes are computed against the *stored* ``scale``/``zero`` (after the cast to
``scale_dtype``), so every weight is rounded to the nearest point of the grid
that is actually stored.

Error bound: for every weight inside the grid's range extended by half a step,
``|w - w'| <= scale / 2`` (up to ``float32`` arithmetic). Rounding ``scale``
and ``zero`` to ``scale_dtype`` (unit roundoff ``u``; ``2**-11`` for
``float16``) can leave a group's extreme values just outside that range; they
are clipped to the end of the grid, adding at most about
``2 * u * max(|w|)`` over the group (``(2**(bits-1)) * |scale - scale_exact|``
plus ``|zero - min|``). An all-zero group gets ``scale = 0`` and decodes to
exact zeros.

References:
  Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training
  Quantization for Generative Pre-trained Transformers", ICLR 2023,
  arXiv:2210.17323 (RTN baseline and the symmetric grid convention).
  llama.cpp ``ggml/src/ggml-quants.c``, ``quantize_row_q4_1_ref``
  (``d = (max - min) / 15``, ``m = min``, ``w = d * q + m``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compressjax.formats import base
from compressjax.formats import quantized
from compressjax.formats.quantized import QuantizedArray

__all__ = ["RTN_BITS", "quantize_codes", "quantize_rtn", "rtn_codes", "rtn_params"]

#: Code widths supported by :func:`quantize_rtn`.
RTN_BITS = quantized.QUANTIZED_BITS


def _check_bits(bits: Any) -> None:
  if isinstance(bits, bool) or not isinstance(bits, int) or bits not in RTN_BITS:
    raise ValueError(f"bits must be one of {RTN_BITS}, got bits={bits!r}.")


def _check_weight(w: jax.Array) -> None:
  if w.ndim != 2:
    raise ValueError(f"w must be a 2-D (K, N) weight, got shape {tuple(w.shape)}.")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"w must have a floating dtype, got {w.dtype}.")


def _resolve_group_size(group_size: int | None, k: int) -> int:
  if group_size is None:
    return k
  if isinstance(group_size, bool) or not isinstance(group_size, int) or (
      group_size <= 0 or k % group_size):
    raise ValueError(
        f"group_size must be a positive divisor of K={k} (or None for per-channel), got "
        f"group_size={group_size!r}; valid group sizes for K={k} are "
        f"{quantized.valid_group_sizes(k)}.")
  return group_size


def rtn_params(wg: jax.Array, *, bits: int, symmetric: bool = True,
               scale_dtype: Any = jnp.float16) -> tuple[jax.Array, jax.Array | None]:
  """Returns the RTN ``(scale, zero)`` of grouped weights, stored in ``scale_dtype``.

  Args:
    wg: grouped weights of shape ``(G, group_size, N)``; statistics reduce
      over axis 1.
    bits: code width.
    symmetric: symmetric absmax grid (``zero`` is ``None``) or asymmetric
      min/max grid (``zero = min``).
    scale_dtype: dtype of the returned ``scale`` and ``zero``.

  Returns:
    ``(scale, zero)``, each ``(G, N)`` (``zero`` is ``None`` when symmetric).

  Examples:
    >>> import jax.numpy as jnp
    >>> wg = jnp.array([[-1.0, 0.5, 2.0]]).reshape(1, 3, 1)
    >>> scale, zero = rtn_params(wg, bits=2, symmetric=False, scale_dtype=jnp.float32)
    >>> scale.tolist(), zero.tolist()
    ([[1.0]], [[-1.0]])
  """
  _check_bits(bits)
  levels = 2**bits - 1
  wg = wg.astype(base.accumulation_dtype(wg.dtype))
  if symmetric:
    absmax = jnp.max(jnp.abs(wg), axis=1)
    return (2.0 * absmax / levels).astype(scale_dtype), None
  wmin = jnp.min(wg, axis=1)
  wmax = jnp.max(wg, axis=1)
  return ((wmax - wmin) / levels).astype(scale_dtype), wmin.astype(scale_dtype)


def quantize_codes(w: jax.Array, scale: jax.Array, zero: jax.Array | None, *, bits: int,
                   symmetric: bool = True) -> jax.Array:
  """Rounds ``w`` to the nearest code of the grid ``(scale, zero)``.

  ``w``, ``scale`` and ``zero`` must broadcast together (e.g. ``(G, gs, N)``
  with ``scale[:, None, :]``, or one column with its group's scale). A zero
  ``scale`` is treated as 1, so an all-zero group gets the code of 0 and no
  NaN. This is the per-element rounding step that RTN applies to all weights
  at once and GPTQ applies column by column.

  Returns:
    ``uint8`` codes in ``[0, 2**bits)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> quantize_codes(jnp.array([-1.0, 0.0, 0.74, 9.0]), jnp.array(0.5), None,
    ...                bits=3).tolist()
    [2, 4, 5, 7]
  """
  _check_bits(bits)
  ctype = base.accumulation_dtype(w.dtype)
  s = scale.astype(ctype)
  s = jnp.where(s == 0, jnp.ones_like(s), s)
  w = w.astype(ctype)
  if symmetric:
    q = jnp.round(w / s) + 2**(bits - 1)
  else:
    q = jnp.round((w - zero.astype(ctype)) / s)
  return jnp.clip(q, 0, 2**bits - 1).astype(jnp.uint8)


def rtn_codes(w: jax.Array, *, bits: int, group_size: int | None = None, symmetric: bool = True,
              scale_dtype: Any = jnp.float16) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """RTN-quantizes a ``(K, N)`` weight to unpacked codes, scale and zero.

  Args:
    w: floating weight of shape ``(K, N)``.
    bits: code width, one of ``(2, 3, 4, 8)``.
    group_size: rows per group along ``K``; ``None`` means per-channel
      (``group_size = K``). Must divide ``K``.
    symmetric: symmetric (GPTQ) or asymmetric min/max (``Q4_1``) grid.
    scale_dtype: dtype in which ``scale``/``zero`` are stored (and used).

  Returns:
    ``(codes, scale, zero)``: ``uint8`` codes ``(K, N)``, ``scale`` and
    ``zero`` of shape ``(K // group_size, N)`` in ``scale_dtype``; ``zero`` is
    ``None`` when ``symmetric``.

  Raises:
    ValueError: if ``bits``, ``group_size`` or the shape of ``w`` is invalid.
  """
  _check_bits(bits)
  _check_weight(w)
  k, n = w.shape
  gs = _resolve_group_size(group_size, k)
  wg = w.reshape(k // gs, gs, n)
  scale, zero = rtn_params(wg, bits=bits, symmetric=symmetric, scale_dtype=scale_dtype)
  codes = quantize_codes(wg, scale[:, None, :], None if zero is None else zero[:, None, :],
                         bits=bits, symmetric=symmetric)
  return codes.reshape(k, n), scale, zero


def quantize_rtn(w: jax.Array, *, bits: int, group_size: int | None = None,
                 symmetric: bool = True, scale_dtype: Any = jnp.float16) -> QuantizedArray:
  """Round-to-nearest quantization of a ``(K, N)`` weight into a :class:`QuantizedArray`.

  See the module docstring for the grids and the error bound
  ``|w - w'| <= scale / 2`` (plus ``scale_dtype`` rounding slack at a group's
  extremes).

  Args:
    w: floating weight of shape ``(K, N)`` (``(in, out)``).
    bits: code width, one of ``(2, 3, 4, 8)``.
    group_size: rows per group along ``K``; ``None`` means per-channel
      (``group_size = K``). Must divide ``K``.
    symmetric: symmetric (GPTQ) or asymmetric min/max (``Q4_1``) grid.
    scale_dtype: dtype in which ``scale``/``zero`` are stored (and used).

  Returns:
    A :class:`QuantizedArray` whose logical dtype is ``w.dtype``.

  Raises:
    ValueError: if ``bits`` is not in ``(2, 3, 4, 8)`` (names ``bits``), if
      ``group_size`` does not divide ``K`` (names ``group_size``, ``K`` and the
      valid group sizes), or if ``w`` is not 2-D (shows the shape).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> w = jax.random.normal(jax.random.key(0), (128, 16))
    >>> qw = quantize_rtn(w, bits=4, group_size=32)
    >>> qw
    QuantizedArray(shape=(128, 16), dtype=float32, bits=4, group_size=32, symmetric=True)
    >>> qw.bits_per_param
    4.5
    >>> scale = jnp.repeat(qw.scale.astype(jnp.float32), 32, axis=0)
    >>> bool(jnp.all(jnp.abs(w - qw.materialize()) <= scale / 2 + 1e-2))
    True

  References:
    Frantar et al., "GPTQ", arXiv:2210.17323. llama.cpp ``quantize_row_q4_1_ref``.
  """
  codes, scale, zero = rtn_codes(w, bits=bits, group_size=group_size, symmetric=symmetric,
                                 scale_dtype=scale_dtype)
  return QuantizedArray.from_codes(codes, scale, zero, bits=bits,
                                   group_size=w.shape[0] if group_size is None else group_size,
                                   symmetric=symmetric, dtype=w.dtype)
