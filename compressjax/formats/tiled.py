"""Tiled decode-and-multiply: ``x @ W`` for a compressed ``W`` without building the dense ``W``.

The pure-XLA product of every format that can decode a block of its rows cheaply loops over
tiles of ``T`` consecutive *input* rows (``K``-blocks): it decodes rows ``[s, s + T)`` of ``W``
(reading only that block of the packed storage), multiplies ``x[:, s : s + T] @ W[s : s + T]`` and
accumulates in ``float32``. The largest temporaries are one decoded tile, ``O(T x N)``, and the
``(M, N)`` accumulator, never the ``(K, N)`` weight, at decode shapes (1-16 rows) and prefill
shapes of fewer than ``K / 4`` rows (:data:`TILE_ELEMENTS` is the size of a tile). From
``M >= K / 4`` rows on (:data:`WHOLE_K_ROWS_RATIO`: e.g. evaluation's 8 x 512 rows) the
``(M, N)`` output and accumulator already weigh as much as the weight, and one tile of the whole
``K`` (decode once, one matmul) is used: its temporary is the dense weight, no larger than the
loop's own, and it runs 1.2-1.8x faster than the loop there.

A format plugs in with :func:`register_rows_decoder`: ``prepare(w)`` runs once outside the loop
(small per-layer work: decoding compressed scales, prefix counts of a mask) and returns
``decode(start, size, dtype)``, rows ``[start, start + size)`` of ``w.materialize()`` as a
``(size, N)`` array, where ``size`` is static and ``start`` may be traced (a multiple of the
format's :func:`row_alignment`, e.g. 32 for codes packed 32 to a block along ``K``, and a
multiple of ``size`` unless the block ends at ``K``). Dense arrays and formats without a decoder fall back to
``materialize()`` and a slice, which *does* build the dense weight; :func:`has_rows_decoder`
says which case applies.

References:
  Frantar et al., "MARLIN: Mixed-Precision Auto-Regressive Parallel Inference on Large Language
  Models", arXiv:2408.11743 (decode a tile of packed weights next to the multiply, never the
  whole matrix); the same loop structure as the K-blocked GEMM of Goto & van de Geijn, "Anatomy
  of High-Performance Matrix Multiplication", ACM TOMS 2008.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from compressjax.formats import base

__all__ = [
    "MIN_TILE_ROWS",
    "TILE_ELEMENTS",
    "WHOLE_K_ROWS_RATIO",
    "after_input",
    "decode_rows",
    "has_rows_decoder",
    "pick_tile",
    "group_rows",
    "register_rows_decoder",
    "row_alignment",
    "rows_decoder",
    "tiled_dot",
]

#: Target number of weight elements decoded per tile (``T * N``); tiles have at least
#: :data:`MIN_TILE_ROWS` rows. Read from a sweep on the shared 2-core CPU host (jitted, median of
#: 7, float32 activations, 4-bit g64, ms for T = 32 / 64 / 128 / 192 / 288 rows; noisy, +-30%):
#: ``576x1536`` at 1 row 0.33 / 0.43 / 0.38 / 0.30 / 0.31, at 16 rows 0.87 / 0.80 / 1.08 / 0.76 /
#: 0.88, at 512 rows 15.0 / 9.6 / 8.5 / 7.9 / 13.8; ``1536x576`` at 1 row 0.36 / 0.68 / 0.18 /
#: 0.45 / 0.32, at 16 rows 1.08 / 1.16 / 1.30 / 0.59 / 0.47, at 512 rows 12.1 / 11.4 / 8.6 / 8.1 /
#: 7.9. Small tiles lose at prefill shapes (the ``(M, N)`` accumulator is re-read per tile), one
#: tile of the whole ``K`` loses everywhere; 150-450 rows is flat within the noise.
TILE_ELEMENTS = 1 << 18

#: Smallest tile (rows) :func:`pick_tile` chooses when ``K`` allows two tiles of it.
MIN_TILE_ROWS = 128

#: From ``rows >= WHOLE_K_ROWS_RATIO * K`` on, :func:`tiled_dot` decodes the whole weight once
#: and multiplies (one tile). Measured (``experiments/bench_prefill.py``, 4-bit g64, float32,
#: shared 2-core host, medians of 3-5 interleaved; ms old ``x @ w.materialize()`` / dense f32 /
#: tiled with the default tile / tile ``K/2``): ``576x1536`` at 512 rows 7.3 / 7.6 / 9.5 / 8.4,
#: at 4096 rows 174 / 166 / 301 / 199; ``1536x576`` at 512 rows 8.8 / 12.2 / 11.8 / 12.0, at 4096
#: rows 162 / 193 / 214 / 148; ``576x576`` at 4096 rows 69 / 79 / 110 / 80. At 4096 rows the
#: tiled loop's temporaries (two ``(M, N)`` float32 accumulators, 16-53 MB) were 5-15x the dense
#: weight it avoided (1.3-3.5 MB).
WHOLE_K_ROWS_RATIO = 0.25

#: Whether :func:`tiled_dot` ties each decode to its input (:func:`after_input`); off only to
#: measure the program without it (``experiments/diag_sparse_compile.py``, the memory test).
TIE_DECODE_TO_INPUT = True

DecodeFn = Callable[[Any, int, Any], jax.Array]
PrepareFn = Callable[[Any], DecodeFn]
AlignFn = Callable[[Any], int]

_DECODERS: dict[type, tuple[PrepareFn, AlignFn]] = {}


def register_rows_decoder(format_cls: type, prepare: PrepareFn, alignment: AlignFn) -> None:
  """Registers the row-block decoder of ``format_cls``.

  Args:
    format_cls: a :class:`~compressjax.formats.CompressedArray` subclass.
    prepare: ``prepare(w) -> decode``, run once per product outside the tile loop;
      ``decode(start, size, dtype) -> (size, N)`` rows ``[start, start + size)`` of
      ``w.materialize()`` in ``dtype``; ``start`` may be a tracer and is a multiple of
      ``alignment(w)``, ``size`` is a static int (the last tile may be shorter).
    alignment: ``alignment(w) -> int``, the multiple every tile start must be.
  """
  _DECODERS[format_cls] = (prepare, alignment)


def _lookup(w: Any):
  for klass in type(w).__mro__:
    if klass in _DECODERS:
      return _DECODERS[klass]
  return None


def has_rows_decoder(w: Any) -> bool:
  """Whether ``w`` (a dense array or compressed leaf) decodes row blocks without its dense form.

  Dense arrays count as decodable (a slice reads only the block).
  """
  return not isinstance(w, base.CompressedArray) or _lookup(w) is not None


def row_alignment(w: Any) -> int:
  """The multiple that tile starts must be for ``w`` (1 for dense arrays)."""
  if not isinstance(w, base.CompressedArray):
    return 1
  entry = _lookup(w)
  return 1 if entry is None else int(entry[1](w))


def rows_decoder(w: Any) -> DecodeFn:
  """``decode(start, size, dtype)`` for ``w`` (dense or compressed); see the module docstring.

  A format without a registered decoder is materialized whole (once) and sliced.
  """
  if not isinstance(w, base.CompressedArray):
    arr = jnp.asarray(w)
  else:
    entry = _lookup(w)
    if entry is not None:
      return entry[0](w)
    arr = w.materialize()
  return lambda start, size, dtype: lax.dynamic_slice_in_dim(arr, start, size, axis=0).astype(
      dtype)


def decode_rows(w: Any, start: Any, size: int, dtype: Any) -> jax.Array:
  """Rows ``[start, start + size)`` of ``w`` (dense or compressed) as a ``(size, N)`` ``dtype``
  array (``rows_decoder(w)(start, size, dtype)``)."""
  return rows_decoder(w)(start, size, dtype)


def pick_tile(k: int, n: int, align: int, target_elements: int | None = None,
              rows: int | None = None) -> int:
  """Tile rows: a multiple of ``align`` near ``target_elements / n``, at most about ``K / 4``;
  the whole ``K`` (one tile: decode, then one matmul) from ``rows >= K / 4`` on.

  The cap keeps a tile's decode temporaries (the tile and one or two copies while it is
  formed) below the dense weight also for small layers. From :data:`WHOLE_K_ROWS_RATIO` ``* K``
  rows on, the loop's own temporaries (the ``(M, N)`` float32 accumulator, carried twice) are at
  least half the dense weight and re-reading it once per tile costs more than decoding the
  weight once, so one tile of the whole ``K`` is both faster and about as small (see
  :data:`WHOLE_K_ROWS_RATIO`).

  Examples:
    >>> pick_tile(1536, 576, 32)
    384
    >>> pick_tile(576, 1536, 32)
    128
    >>> pick_tile(64, 8, 32, 1 << 17)
    32
    >>> pick_tile(576, 1536, 32, rows=16), pick_tile(576, 1536, 32, rows=512)
    (128, 576)
  """
  if rows is not None and rows >= WHOLE_K_ROWS_RATIO * k:
    return int(k)
  target = TILE_ELEMENTS if target_elements is None else int(target_elements)
  rows = max(MIN_TILE_ROWS, target // max(n, 1))
  rows = max(align, rows // align * align)
  quarter = max(align, (k // 4) // align * align)  # >= 4 tiles whenever K allows it
  return int(min(rows, quarter))


def after_input(w: Any, x: jax.Array) -> Any:
  """``w`` with its integer leaves made data-dependent on ``x`` (XOR with a zero computed from
  ``x``): the decode of ``w`` cannot start before ``x`` exists. Bit-exact.

  Without it, XLA:CPU's default concurrency-optimized scheduler starts every decode, which
  reads only parameters, at the top of the program, so in an unrolled model all layers' decoded
  dense weights were live at once: the evaluation program's temporary bytes grew by one dense
  ``float32`` copy of every layer's weights (``compiled.memory_analysis()`` of
  ``evaluate.perplexity``'s program, SmolLM2-135M shapes at 8 x 512 tokens: +13.5 MiB per layer,
  521-543 MiB at 30 layers for 4-bit g64 and 50% ``BitmaskSparse`` against a flat 108 MiB for
  dense weights; ``experiments/diag_sparse_compile.py``). ``lax.optimization_barrier`` does not
  help (XLA:CPU removes barriers before scheduling) and nor does the scheduler's
  ``compiler_options`` entry (only the ``XLA_FLAGS`` environment variable reaches it). The
  zero is ``popcount(bits of x[0, 0]) >> 6`` (a popcount of 32 bits is at most 32), which XLA's
  simplifier does not fold. Dense arrays and ``x`` without elements are returned unchanged.

  References:
    XLA ``DebugOptions.xla_cpu_enable_concurrency_optimized_scheduler`` (xla/xla.proto).
  """
  if not TIE_DECODE_TO_INPUT or not isinstance(w, base.CompressedArray) or x.size == 0:
    return w
  first = x.reshape(-1)[0].astype(jnp.float32)
  zero = lax.shift_right_logical(
      lax.population_count(lax.bitcast_convert_type(first, jnp.uint32)), jnp.uint32(6))

  def tie(a):
    if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.integer):
      return a ^ zero.astype(a.dtype)
    return a

  return jax.tree.map(tie, w)


def tiled_dot(x: jax.Array, w: Any, *, tile: int | None = None,
              compute_dtype: Any = None) -> jax.Array:
  """``x @ w`` over ``K``-tiles of ``w`` decoded one at a time (see the module docstring).

  Args:
    x: ``(..., K)`` activations.
    w: a ``(K, N)`` dense array or compressed leaf (with a registered row decoder, otherwise it
      is materialized once per tile).
    tile: rows per tile (a multiple of :func:`row_alignment`, or ``K``); default
      :func:`pick_tile` for the number of rows of ``x``.
    compute_dtype: dtype of the tile product's operands; default ``result_type(x, w.dtype)``.

  Returns:
    ``(..., N)`` in ``jnp.result_type(x.dtype, w.dtype)``, accumulated in ``float32`` (or
    ``float64``).
  """
  k, n = (int(d) for d in w.shape)
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  acc = base.accumulation_dtype(out_dtype)
  cdtype = out_dtype if compute_dtype is None else compute_dtype
  align = row_alignment(w)
  batch = x.shape[:-1]
  if tile is None:
    tile = pick_tile(k, n, align, rows=math.prod(batch))
  if tile % align and tile != k:
    raise ValueError(f"tile={tile} must be a multiple of the row alignment {align} of {w!r}.")
  xm = x.reshape((math.prod(batch), k)).astype(cdtype)
  w = after_input(w, xm)
  nfull, rem = divmod(k, tile)
  decode = rows_decoder(w)

  def product(xt, wt):
    return jnp.matmul(xt, wt.astype(cdtype), preferred_element_type=acc)

  y = jnp.zeros((xm.shape[0], n), acc)
  if nfull == 1:
    y = product(xm[:, :tile], decode(0, tile, acc))
  elif nfull > 1:
    def body(i, y):
      s = i * tile
      xt = lax.dynamic_slice_in_dim(xm, s, tile, axis=1)
      return y + product(xt, decode(s, tile, acc))
    y = lax.fori_loop(0, nfull, body, y)
  if rem:
    s = nfull * tile
    y = y + product(xm[:, s:], decode(s, rem, acc))
  return y.reshape(batch + (n,)).astype(out_dtype)


def group_rows(values: jax.Array, start: Any, size: int, group_size: int) -> jax.Array:
  """Rows ``start .. start + size`` of ``repeat(values, group_size, axis=0)`` (per-row stats).

  ``values`` is ``(G, ...)`` per-group statistics; reads only the groups the rows fall in.
  ``start`` must be a multiple of ``size`` or the tile must end at ``G * group_size`` (the tiles
  of :func:`tiled_dot`), so that a tile of a multiple of ``group_size`` rows starts on a group
  and a tile of a divisor of ``group_size`` rows lies in one group.
  """
  if size % group_size == 0:
    v = lax.dynamic_slice_in_dim(values, start // group_size, size // group_size, axis=0)
    return jnp.repeat(v, group_size, axis=0, total_repeat_length=size)
  if group_size % size == 0:
    v = lax.dynamic_slice_in_dim(values, start // group_size, 1, axis=0)
    return jnp.broadcast_to(v, (size,) + values.shape[1:])
  g = (start + jnp.arange(size, dtype=jnp.int32)) // group_size
  return jnp.take(values, g, axis=0)
