"""Partition specs of compressed leaves, derived from the dense parameter's spec.

A dense kernel ``(K, N)`` sharded ``P(in_axis, out_axis)`` (column-parallel ``P(None, "model")``,
row-parallel ``P("model", None)``) becomes a compressed leaf whose children are laid out along
the same logical dimensions: packed codes, scales and zero points ``(rows of K, N)`` take
``P(in_axis, out_axis)``; low-rank factors ``A (K, r)`` / ``B (r, N)`` take ``P(in_axis, None)``
/ ``P(None, out_axis)``; N:M values and indices follow the kernel; kept rows keep the output
axis; a transposed leaf swaps the two; lattice codes ``(K // 8, N)`` (E8P, E81B) follow the
kernel. Children without a dense dimension (flat bitmasks,
CSR outliers, codebooks) are replicated. A mesh axis is only kept on a dimension it divides.

The layout is a placement choice, never a correctness one: any sharding of a leaf computes the
same result under :func:`jax.jit`; with these, each device holds the codes, scales and zeros of
its own columns (column-parallel) or rows (row-parallel) of the layer.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from jax.sharding import PartitionSpec as P
  >>> from compressjax import formats
  >>> q = formats.QuantizedArray.from_codes(
  ...     jnp.zeros((64, 32), jnp.uint8), jnp.ones((2, 32), jnp.float16), None,
  ...     bits=4, group_size=32, symmetric=True)
  >>> tuple(formats.partition_specs(q, P(None, "model"), {"model": 4}).packed)
  (None, 'model')
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from compressjax.formats import additive, base, composite, lowrank, quantized, sparse

__all__ = ["partition_specs", "tree_shardings"]


def _size(axis, sizes: Mapping[str, int]) -> int:
  if axis is None:
    return 1
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  return math.prod(sizes[a] for a in names)


def _fit(axis, n: int, sizes) -> Any:
  return axis if axis is not None and n % _size(axis, sizes) == 0 else None


def _specs(x, ia, oa, sizes):
  if x is None:
    return None
  if isinstance(x, quantized.QuantizedArray):
    def rows(a):
      if isinstance(a, base.CompressedArray):  # SpQR's quantized (G, N) statistics
        return _specs(a, ia, oa, sizes)
      return None if a is None else P(_fit(ia, a.shape[0], sizes), _fit(oa, a.shape[1], sizes))
    return dataclasses.replace(x, packed=rows(x.packed), scale=rows(x.scale), zero=rows(x.zero))
  if isinstance(x, lowrank.LowRank):
    return dataclasses.replace(x, a=_specs(x.a, ia, None, sizes), b=_specs(x.b, None, oa, sizes))
  if isinstance(x, composite.SumArray):
    return dataclasses.replace(x, terms=tuple(_specs(t, ia, oa, sizes) for t in x.terms))
  if isinstance(x, composite.Transposed):
    return dataclasses.replace(x, inner=_specs(x.inner, oa, ia, sizes))
  if isinstance(x, sparse.NMSparse):
    return dataclasses.replace(x, values=_specs(x.values, ia, oa, sizes),
                               indices=_specs(x.indices, ia, oa, sizes))
  if isinstance(x, composite.KeptRows):
    return dataclasses.replace(x, rows=P(), values=_specs(x.values, None, oa, sizes))
  if isinstance(x, additive.AdditiveCodebookArray):  # codes (I, N, M) and scales by column
    o = _fit(oa, x.shape[1], sizes)
    return dataclasses.replace(x, codes=P(_fit(ia, x.codes.shape[0], sizes), o, None),
                               codebooks=P(), scales=P(o))
  from compressjax.formats import vq  # pylint: disable=g-import-not-at-top
  if isinstance(x, vq.VQArray):  # codes (rows, N) like W; codebooks (Gk, Gn, E, d) by block
    o = _fit(oa, x.shape[1] // x.out_block, sizes)
    return dataclasses.replace(x, codes=P(_fit(ia, x.codes.shape[0], sizes),
                                          _fit(oa, x.codes.shape[1], sizes)),
                               codebook=P(None, o, None, None), scale=P(None, o))
  from compressjax.formats import e8p  # pylint: disable=g-import-not-at-top
  if isinstance(x, (e8p.E8PArray, e8p.E81BArray)):  # codes (K // 8, N) like W; scalar scale
    return dataclasses.replace(x, codes=P(_fit(ia, x.codes.shape[0], sizes),
                                          _fit(oa, x.codes.shape[1], sizes)), scale=P())
  from compressjax.formats.incoherent import Incoherent  # pylint: disable=g-import-not-at-top
  if isinstance(x, Incoherent):  # the rotated weight is sharded like W; signs replicated
    return dataclasses.replace(x, inner=_specs(x.inner, ia, oa, sizes), su_bits=P(), sv_bits=P())
  if isinstance(x, base.CompressedArray):  # flat or irregular children: replicated
    return jax.tree.map(lambda _: P(), x)
  shape = tuple(x.shape)
  if len(shape) == 2:
    return P(_fit(ia, shape[0], sizes), _fit(oa, shape[1], sizes))
  return P()


def partition_specs(leaf, spec: P, axis_sizes: Mapping[str, int]):
  """The partition specs of ``leaf``'s children, from the dense ``(K, N)`` parameter's ``spec``.

  Args:
    leaf: a compressed leaf (children may be ``jax.ShapeDtypeStruct``), or a dense array.
    spec: the dense kernel's ``PartitionSpec`` (at most two entries: input, output).
    axis_sizes: mesh axis name -> size (``mesh.shape``); an axis that does not divide a
      dimension is dropped on it.

  Returns:
    ``leaf``'s structure with a ``PartitionSpec`` in place of every array child (a
    ``PartitionSpec`` for a dense leaf).

  Raises:
    ValueError: ``spec`` has more than two entries for a 2-D parameter, or names an axis that
      is not in ``axis_sizes``.
  """
  entries = tuple(spec) + (None,) * (2 - len(tuple(spec)))
  if len(entries) > 2 and getattr(leaf, "ndim", 2) == 2:
    raise ValueError(f"partition_specs: spec {spec} has {len(entries)} entries for a 2-D "
                     "(in, out) parameter")
  for a in entries:
    for name in (() if a is None else (a,) if isinstance(a, str) else a):
      if name not in axis_sizes:
        raise ValueError(f"partition_specs: spec {spec} names axis {name!r}, not one of the "
                         f"mesh's {tuple(axis_sizes)}")
  if not base.is_compressed(leaf) and getattr(leaf, "ndim", 0) != 2:
    return P(*[_fit(a, n, axis_sizes) for a, n in zip(entries, leaf.shape)])
  return _specs(leaf, entries[0], entries[1], axis_sizes)


def tree_shardings(tree, dense_spec: Callable[[str, tuple[int, ...]], P], mesh):
  """``NamedSharding`` s for every array of a (compressed) parameter tree on ``mesh``.

  ``dense_spec(path, shape)`` gives the spec the dense parameter at ``path`` (logical
  ``shape``) would have; compressed leaves get :func:`partition_specs` of it. The result has the
  tree's structure (compressed leaves included) and can be passed to ``jax.device_put`` or as a
  ``jit`` ``out_shardings``; it works on abstract trees (``transforms.plan``) too.
  """
  from compressjax.transforms.selection import map_with_path  # pylint: disable=g-import-not-at-top

  sizes = dict(mesh.shape)

  def one(path, leaf):
    specs = partition_specs(leaf, dense_spec(path, tuple(leaf.shape)), sizes)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda s: isinstance(s, P))

  return map_with_path(one, tree)
