"""Straight-through estimation (quantization-aware fine-tuning) of compressed leaves.

:func:`to_ste` replaces each selected compressed leaf by an :class:`STEWeight`: a latent
full-precision weight initialised from the leaf's decoded weight, the leaf's continuous
children (scales, zeros) and its codes. At every forward pass the codes are **recomputed from
the latent weight** (:mod:`compressjax.finetune.codes_core`: rounding to the grid of the current
scales/zeros, or the nearest codeword), the compressed leaf they form multiplies the activations
through the same :func:`compressjax.formats.dot` path as the compressed model (so the forward
pass is the compressed model's, exactly), and the backward pass is straight-through:

* latent: ``dL/dW = dL/dW_hat`` (times the un-clipped mask for scalar grids);
* scales/zeros: the gradient of ``W_hat = s * (q - 2**(b-1))`` (or ``s * q + z``; VQ:
  ``s * codebook[q]``) with the codes ``q`` held fixed, as the P-step computes it.

:func:`export` turns the tree back into the original formats (codes from the final latents).

Formats: :class:`~compressjax.formats.QuantizedArray` (plain-array scales/zeros) and
:class:`~compressjax.formats.VQArray` (nearest codeword; ``int8`` codewords stay fixed, the
scales train). Not done: AQLM (:class:`~compressjax.formats.AdditiveCodebookArray`), E8P,
quantized values inside sparse formats, bilevel (compressed) scales: :func:`to_ste` refuses
them by name.

References:
  Bengio, Léonard, Courville, arXiv:1308.3432 (straight-through estimator); Esser et al.,
  "Learned Step Size Quantization", arXiv:1902.08153 (clipped STE, trainable step sizes);
  Malinovskii et al., "PV-Tuning", arXiv:2405.14852 (STE as the baseline of Sec. 3.1).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import formats
from compressjax.finetune import codes_core
from compressjax.formats import base
from compressjax.transforms.selection import Selector, as_predicate, map_with_path

__all__ = ["STEWeight", "export", "is_ste", "to_ste"]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class STEWeight(base.CompressedArray):
  """A compressed leaf under straight-through training.

  Invariants: ``kind`` is ``"scalar"`` (a :class:`~compressjax.formats.QuantizedArray`) or
  ``"vq"`` (a :class:`~compressjax.formats.VQArray`); ``meta`` holds that format's static
  metadata as sorted ``(name, value)`` pairs; ``latent`` is ``float32`` ``shape``; ``scale``
  (and ``zero``) are the format's; ``codebook`` the ``int8`` VQ codebook (``None`` for
  scalar); ``codes0`` the stored codes of the leaf it was made from (its container), used only
  to break ties (:mod:`~compressjax.finetune.codes_core`). :meth:`compressed` is the leaf of the
  codes recomputed from ``latent``; :meth:`materialize` its decoded weight.
  """

  latent: jax.Array
  scale: jax.Array
  zero: jax.Array | None
  codebook: jax.Array | None
  codes0: jax.Array
  kind: str = dataclasses.field(metadata=dict(static=True), kw_only=True)
  meta: tuple = dataclasses.field(metadata=dict(static=True), kw_only=True)
  #: ``"latent"``: the forward pass uses codes recomputed from ``latent`` (STE);
  #: ``"stored"``: it uses ``codes0`` and ``latent`` is PV-tuning's straight-through buffer
  #: (it receives ``dL/dW_hat``; :mod:`compressjax.finetune.pv` re-encodes codes from it).
  forward_codes: str = dataclasses.field(default="latent", metadata=dict(static=True),
                                         kw_only=True)

  trainable: ClassVar[tuple[str, ...]] = ("latent", "scale", "zero")

  @property
  def m(self) -> dict[str, Any]:
    return dict(self.meta)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.m["shape"])

  @property
  def dtype(self):
    return np.dtype(self.m["dtype"])

  @property
  def unit_rows(self) -> int:
    """Input rows per code (1 for scalar grids, ``dim`` for VQ)."""
    return 1 if self.kind == "scalar" else self.m["dim"]

  def __repr__(self):
    return f"STEWeight({self.kind}, shape={self.shape}, {dict(self.meta)})"

  def prev_codes(self) -> jax.Array:
    """The unpacked ``codes0`` (``int32``)."""
    return _unpacked(self.kind, self.meta, self.codes0, self.scale, self.zero, self.codebook)

  def codes(self, latent=None) -> jax.Array:
    """The codes of the forward pass (``int32``): recomputed from ``latent`` (default: the
    leaf's), or the stored ones when ``forward_codes == "stored"`` and no latent is given."""
    if latent is None and self.forward_codes == "stored":
      return self.prev_codes()
    return _encode(self.kind, self.meta, self.latent if latent is None else latent, self.scale,
                   self.zero, self.codebook, self.codes0)

  def compressed(self, codes=None):
    """The original format's leaf with ``codes`` (default: recomputed from the latent)."""
    return _wrap(self.kind, self.meta, None, self.scale, self.zero, self.codebook,
                 self.codes() if codes is None else codes)

  def decode(self, codes) -> jax.Array:
    """``float32`` decoded weight of ``codes`` with the current continuous children."""
    return _decode32(self.kind, self.meta, codes, self.scale, self.zero, self.codebook)

  def materialize(self) -> jax.Array:
    return self.compressed().materialize()


jax.tree_util.register_dataclass(
    STEWeight, data_fields=["latent", "scale", "zero", "codebook", "codes0"],
    meta_fields=["kind", "meta", "forward_codes"])


def is_ste(x) -> bool:
  return isinstance(x, STEWeight)


def _unpacked(kind, meta, stored, scale, zero, codebook):
  leaf = _wrap(kind, meta, stored, scale, zero, codebook, None)
  return (leaf.codes() if kind == "scalar" else leaf.code_values()).astype(jnp.int32)


def _wrap(kind, meta, stored, scale, zero, codebook, codes):
  """The format's leaf from stored codes (``stored``) or unpacked ``codes``."""
  m = dict(meta)
  if kind == "scalar":
    packed = stored if codes is None else formats.pack(codes.astype(jnp.uint32), m["bits"],
                                                       axis=0)
    return formats.QuantizedArray(packed, scale, zero, bits=m["bits"],
                                  group_size=m["group_size"], shape=m["shape"],
                                  symmetric=m["symmetric"], dtype=m["dtype"])
  if codes is None:
    container = stored
  else:
    from compressjax.formats import vq  # pylint: disable=g-import-not-at-top
    kind_c = vq.code_container(m["code_bits"])
    container = (formats.pack(codes.astype(jnp.uint32), m["code_bits"], axis=0)
                 if kind_c == "packed" else
                 codes.astype(jnp.uint8 if kind_c == "uint8" else jnp.uint16))
  return formats.VQArray(container, codebook, scale, dim=m["dim"], code_bits=m["code_bits"],
                         group_size=m["group_size"], out_block=m["out_block"],
                         shape=m["shape"], dtype=m["dtype"])


def _encode(kind, meta, latent, scale, zero, codebook, codes0):
  m = dict(meta)
  prev = _unpacked(kind, meta, codes0, scale, zero, codebook)
  if kind == "scalar":
    return codes_core.scalar_encode(latent, scale, zero, prev, bits=m["bits"],
                                    group_size=m["group_size"], symmetric=m["symmetric"])
  cent = codebook.astype(jnp.float32) * scale.astype(jnp.float32)[..., None, None]
  return codes_core.vq_encode(latent, cent, prev, dim=m["dim"], group_size=m["group_size"],
                              out_block=m["out_block"])


def _decode32(kind, meta, codes, scale, zero, codebook):
  """``float32`` decoded weight (not cast to the leaf's dtype)."""
  m = dict(meta)
  k, n = m["shape"]
  if kind == "scalar":
    g = k // m["group_size"]
    z = None if zero is None else zero[:, None, :]
    return formats.dequantize(codes.reshape(g, m["group_size"], n), scale[:, None, :], z,
                              bits=m["bits"], symmetric=m["symmetric"]).reshape(k, n)
  leaf = _wrap(kind, meta, None, scale, zero, codebook, codes)
  acc = jnp.float32
  gk, gn, e, d = codebook.shape
  c = codes.reshape(gk, (k // d) // gk, gn, m["out_block"])
  base_idx = (jnp.arange(gk)[:, None, None, None] * gn + jnp.arange(gn)[None, None, :, None]) * e
  vals = jnp.take(leaf.centroids().astype(acc).reshape(gk * gn * e, d), base_idx + c, axis=0)
  return vals.transpose(0, 1, 4, 2, 3).reshape(k, n)


# --- the straight-through product -------------------------------------------------------------


def _forward_codes(kind, meta, stored, latent, scale, zero, codebook, codes0):
  if stored:
    return _unpacked(kind, meta, codes0, scale, zero, codebook)
  return _encode(kind, meta, latent, scale, zero, codebook, codes0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _ste_dot(x, latent, scale, zero, codebook, codes0, kind, meta, stored):
  codes = _forward_codes(kind, meta, stored, latent, scale, zero, codebook, codes0)
  return formats.dot(x, _wrap(kind, meta, None, scale, zero, codebook, codes))


def _ste_dot_fwd(x, latent, scale, zero, codebook, codes0, kind, meta, stored):
  codes = _forward_codes(kind, meta, stored, latent, scale, zero, codebook, codes0)
  y = formats.dot(x, _wrap(kind, meta, None, scale, zero, codebook, codes))
  return y, (x, latent, scale, zero, codebook, codes0, codes)


def _ste_dot_bwd(kind, meta, stored, res, g):
  x, latent, scale, zero, codebook, codes0, codes = res
  m = dict(meta)
  k, n = m["shape"]
  w_hat = _decode32(kind, meta, codes, scale, zero, codebook)
  x2 = x.reshape(-1, k).astype(jnp.float32)
  g2 = g.reshape(-1, n).astype(jnp.float32)
  dx = (g2 @ w_hat.T).reshape(x.shape).astype(x.dtype)
  dw = x2.T @ g2  # dL / dW_hat, (K, N)
  dzero = None
  if kind == "scalar":
    gs = m["group_size"]
    if stored:  # PV buffer: the gradient w.r.t. the decoded weight itself
      dlat = dw
    else:
      dlat = dw * codes_core.scalar_in_range(latent, scale, zero, bits=m["bits"], group_size=gs,
                                             symmetric=m["symmetric"])
    q = codes.astype(jnp.float32) - (2.0**(m["bits"] - 1) if m["symmetric"] else 0.0)
    dscale = (dw * q).reshape(k // gs, gs, n).sum(1)
    if zero is not None:
      dzero = dw.reshape(k // gs, gs, n).sum(1).astype(zero.dtype)
  else:
    dlat = dw
    gk, gn = scale.shape
    unscaled = _decode32(kind, meta, codes, jnp.ones_like(scale, jnp.float32), None, codebook)
    dscale = (dw * unscaled).reshape(gk, k // gk, gn, n // gn).sum((1, 3))
  return (dx, dlat.astype(latent.dtype), dscale.astype(scale.dtype), dzero, None, None)


_ste_dot.defvjp(_ste_dot_fwd, _ste_dot_bwd)


def ste_matmul_xla(x: jax.Array, w: STEWeight) -> jax.Array:
  """``x @ W_hat`` (the compressed leaf of the recomputed codes, through :func:`formats.dot`)
  with the straight-through backward pass of the module docstring."""
  return _ste_dot(x, w.latent, w.scale, w.zero, w.codebook, w.codes0, w.kind, w.meta,
                  w.forward_codes == "stored")


formats.register_matmul(STEWeight, "xla", ste_matmul_xla, priority=formats.FALLBACK_PRIORITY)


# --- tree conversion --------------------------------------------------------------------------


def _from_leaf(path: str, leaf) -> STEWeight:
  if isinstance(leaf, formats.QuantizedArray):
    for name in ("scale", "zero"):
      v = getattr(leaf, name)
      if isinstance(v, base.CompressedArray):
        raise NotImplementedError(f"to_ste: {path}: {name} is itself compressed "
                                  f"({type(v).__name__}); STE needs plain-array scales/zeros")
    meta = tuple(sorted(dict(bits=leaf.bits, group_size=leaf.group_size, shape=leaf.shape,
                             symmetric=leaf.symmetric, dtype=leaf.dtype.name).items()))
    kind, codebook = "scalar", None
    stored = leaf.packed
  elif isinstance(leaf, formats.VQArray):
    meta = tuple(sorted(dict(dim=leaf.dim, code_bits=leaf.code_bits,
                             group_size=leaf.group_size, out_block=leaf.out_block,
                             shape=leaf.shape, dtype=leaf.dtype.name).items()))
    kind, codebook = "vq", leaf.codebook
    stored = leaf.codes
  else:
    raise NotImplementedError(
        f"to_ste: {path} is a {type(leaf).__name__}; straight-through training supports "
        "QuantizedArray and VQArray (select other leaves out with `where`)")
  codes = _unpacked(kind, meta, stored, leaf.scale, getattr(leaf, "zero", None), codebook)
  latent = _decode32(kind, meta, codes, leaf.scale, getattr(leaf, "zero", None), codebook)
  w = STEWeight(latent, leaf.scale, getattr(leaf, "zero", None), codebook, stored, kind=kind,
                meta=meta)
  again = w.codes()
  if not bool(jnp.array_equal(again, codes)):
    bad = int(jnp.sum(again != codes))
    raise AssertionError(f"to_ste: {path}: re-encoding the decoded weight changed {bad} of "
                         f"{codes.size} codes (the forward pass would not be the compressed "
                         "model's)")
  return w


def to_ste(params: Any, where: Selector = None, forward_codes: str = "latent") -> Any:
  """``params`` with each compressed leaf selected by ``where`` (default: all) replaced by an
  :class:`STEWeight` whose codes, re-encoded from its latent, equal the stored codes (checked:
  the forward pass starts as the compressed model's, exactly).

  Raises:
    NotImplementedError: a selected leaf's format is not supported (named).
    ValueError: ``where`` selects no compressed leaf.
  """
  if forward_codes not in ("latent", "stored"):
    raise ValueError(f"to_ste: forward_codes must be 'latent' or 'stored', got {forward_codes!r}")
  pick = (lambda p, x: True) if where is None else as_predicate(where)
  hits = [0]

  def one(path, leaf):
    if isinstance(leaf, base.CompressedArray) and pick(path, leaf):
      hits[0] += 1
      return dataclasses.replace(_from_leaf(path, leaf), forward_codes=forward_codes)
    return leaf

  out = map_with_path(one, params)
  if not hits[0]:
    raise ValueError(f"to_ste: where={where!r} matched no compressed leaf")
  return out


def export(params: Any) -> Any:
  """The tree with every :class:`STEWeight` turned back into its original format, codes
  recomputed from its latent (what its forward pass used)."""
  return jax.tree.map(lambda x: x.compressed() if is_ste(x) else x, params, is_leaf=is_ste)
