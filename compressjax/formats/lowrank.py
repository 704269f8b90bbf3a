"""Low-rank weight format ``W ~ A @ B``.

:class:`LowRank` stores two factors, each a dense array or any compressed leaf (e.g. a
:class:`~compressjax.formats.QuantizedArray`), and multiplies as ``(x @ A) @ B`` without ever
forming ``W``. A compressed base plus a low-rank correction (EoRA, LQ-LoRA) is
``SumArray((base, LowRank(A, B)))``; the sum format multiplies its low-rank terms factorized too.

References:
  Hu et al. 2021, LoRA (the ``A @ B`` adapter layout); Liu et al. 2024, EoRA (arXiv:2410.21271).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import base
from compressjax.formats import dispatch
from compressjax.formats import tiled

__all__ = ["LowRank"]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class LowRank(base.CompressedArray):
  """``W = A @ B`` with ``A`` ``(K, r)`` and ``B`` ``(r, N)``, each dense or compressed.

  Invariants: both factors are 2-D with matching inner dimension ``r >= 1``; ``shape`` is
  ``(A.shape[0], B.shape[1])``; ``dtype`` is what :meth:`materialize` returns. ``x @ W`` is
  ``dot(dot(x, A), B)``: ``r (K + N)`` multiply-adds per row instead of ``K N``.

  Examples:
    >>> import jax.numpy as jnp
    >>> lr = LowRank(jnp.ones((6, 2)), jnp.ones((2, 3)), dtype=jnp.float32)
    >>> lr.shape, lr.materialize()[0].tolist(), lr.nbytes
    ((6, 3), [2.0, 2.0, 2.0], 72)
  """

  # Dense float factors may be tuned; compressed factors declare their own.
  trainable: ClassVar[tuple[str, ...]] = ("a", "b")

  a: object
  b: object
  dtype: object = dataclasses.field(metadata=dict(static=True), kw_only=True)

  def __post_init__(self):
    object.__setattr__(self, "dtype", np.dtype(self.dtype))
    sa, sb = getattr(self.a, "shape", None), getattr(self.b, "shape", None)
    if isinstance(sa, tuple) and isinstance(sb, tuple):
      if len(sa) != 2 or len(sb) != 2 or sa[1] != sb[0]:
        raise ValueError(f"LowRank factors must be (K, r) and (r, N), got {sa} and {sb}.")

  @property
  def shape(self) -> tuple[int, ...]:
    return (int(self.a.shape[0]), int(self.b.shape[1]))

  @property
  def rank(self) -> int:
    return int(self.a.shape[1])

  def __repr__(self):
    return (f"LowRank(shape={self.shape}, rank={self.rank}, dtype={self.dtype.name}, "
            f"a={type(self.a).__name__}, b={type(self.b).__name__})")

  def materialize(self) -> jax.Array:
    acc = base.accumulation_dtype(self.dtype)
    a = dispatch.materialize(self.a).astype(acc)
    b = dispatch.materialize(self.b).astype(acc)
    return jnp.matmul(a, b, preferred_element_type=acc).astype(self.dtype)


def lowrank_matmul_xla(x: jax.Array, w: LowRank) -> jax.Array:
  """``(x @ A) @ B``, each product through the dispatch point."""
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  acc = base.accumulation_dtype(out_dtype)
  h = dispatch.dot(x.astype(out_dtype), w.a).astype(acc)
  return dispatch.dot(h, w.b).astype(out_dtype)


def _prepare_lowrank_rows(w: LowRank):
  """Tile decoder (rows of ``A @ B``): a tile of ``A`` times the small ``(r, N)`` ``B``."""
  a = tiled.rows_decoder(w.a)
  b = dispatch.materialize(w.b)

  def decode(start, size, dtype):
    acc = base.accumulation_dtype(dtype)
    return jnp.matmul(a(start, size, acc), b.astype(acc), preferred_element_type=acc).astype(dtype)

  return decode


tiled.register_rows_decoder(LowRank, _prepare_lowrank_rows, lambda w: tiled.row_alignment(w.a))
jax.tree_util.register_dataclass(LowRank, data_fields=["a", "b"], meta_fields=["dtype"])
dispatch.register_matmul(LowRank, "xla", lowrank_matmul_xla, priority=dispatch.FALLBACK_PRIORITY)
