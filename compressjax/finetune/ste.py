"""Straight-through estimation (quantization-aware fine-tuning) of compressed leaves.

:func:`to_ste` replaces each selected compressed leaf by an :class:`STEWeight`: a latent
full-precision weight initialised from the leaf's decoded weight, the leaf's continuous
children (scales, zeros) and its codes. At every forward pass the codes are **recomputed from
the latent weight** (:mod:`compressjax.finetune.codes_core`: rounding to the grid of the current
scales/zeros, or the nearest codeword), the compressed leaf they form multiplies the activations
through the same :func:`compressjax.formats.dot` path as the compressed model (so the forward
pass is the compressed model's, exactly), and the backward pass is straight-through:

* latent: ``dL/dW = dL/dW_hat`` (times the un-clipped mask for scalar grids);
* scales/zeros/codebooks: the gradient of ``W_hat = s * (q - 2**(b-1))`` (or ``s * q + z``;
  VQ: ``s * codebook[q]``; AQLM: ``s * sum_m C[m, q_m]``; E8P: ``s * E8P(q)``) with the codes
  ``q`` held fixed, as the P-step computes it.

:func:`export` turns the tree back into the original formats (codes from the final latents).

Formats (``kind``):

* ``"scalar"``: :class:`~compressjax.formats.QuantizedArray` (plain-array scales/zeros);
* ``"vq"``: :class:`~compressjax.formats.VQArray` (nearest codeword; ``int8`` codewords stay
  fixed, the scales train);
* ``"aqlm"``: :class:`~compressjax.formats.AdditiveCodebookArray`: codes from the L2 beam
  search of :func:`codes_core.additive_encode` (``beam_size``, default 1: coordinate descent
  over the ``M`` codebooks), warm-started from the stored codes; the codebooks and scales
  train (gradient of ``W_hat = s * sum_m C[m, b_m]`` with the codes fixed). **Expensive**:
  STE re-encodes every group of every AQLM weight at every forward pass, ``M * 2**B * g``
  multiply-adds per weight group (2x8, g = 8: 4096 per 8 weights, ~0.9 GFLOP for one
  576x1536 weight); PV-tuning (stored-code forward) pays it once per V-step instead;
* ``"e8p"``: :class:`~compressjax.formats.E8PArray`: exact nearest-lattice rounding of
  ``latent / scale`` (:func:`codes_core.e8p_encode`); the per-layer scale trains;
* an :class:`~compressjax.formats.Incoherent` leaf whose inner leaf is one of these keeps its
  random signs and Hadamard rotations and gets an :class:`STEWeight` as its inner leaf: the
  latent lives in the rotated space (the inner leaf's), and the product still rotates the
  activations around it, so the forward pass is the compressed model's exactly.

Not done: quantized values inside sparse formats, bilevel (compressed) scales: :func:`to_ste`
refuses them by name.

References:
  Bengio, Léonard, Courville, arXiv:1308.3432 (straight-through estimator); Esser et al.,
  "Learned Step Size Quantization", arXiv:1902.08153 (clipped STE, trainable step sizes);
  Malinovskii et al., "PV-Tuning", arXiv:2405.14852 (STE as the baseline of Sec. 3.1);
  Egiazarian et al., AQLM, arXiv:2401.06118; Tseng et al., QuIP#, arXiv:2402.04396 (E8P).
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
from compressjax.quantize import aqlm_core
from compressjax.quantize import e8p_core
from compressjax.transforms.selection import Selector, as_predicate, map_with_path

__all__ = ["STEWeight", "export", "is_ste", "to_ste"]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class STEWeight(base.CompressedArray):
  """A compressed leaf under straight-through training.

  Invariants: ``kind`` is ``"scalar"`` (a :class:`~compressjax.formats.QuantizedArray`),
  ``"vq"`` (a :class:`~compressjax.formats.VQArray`), ``"aqlm"`` (an
  :class:`~compressjax.formats.AdditiveCodebookArray`) or ``"e8p"`` (an
  :class:`~compressjax.formats.E8PArray`); ``meta`` holds that format's static metadata as
  sorted ``(name, value)`` pairs (AQLM: also the encoder's ``beam_size``); ``latent`` is
  ``float32`` ``shape``; ``scale`` (and ``zero``) are the format's (AQLM: ``scales`` ``(N,)``;
  E8P: the scalar scale); ``codebook`` the ``int8`` VQ codebook or the floating AQLM
  ``codebooks`` ``(M, 2**B, g)`` (``None`` otherwise); ``codes0`` the stored codes of the leaf
  it was made from (its container), the warm start and tie-breaker of re-encoding
  (:mod:`~compressjax.finetune.codes_core`). :meth:`compressed` is the leaf of the
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

  #: ``codebook`` trains only where it is floating (AQLM); VQ's ``int8`` one never does.
  trainable: ClassVar[tuple[str, ...]] = ("latent", "scale", "zero", "codebook")

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
    """Input rows per unit of codes (1 for scalar grids, ``dim`` for VQ, ``g`` for AQLM (a
    unit is the ``M`` codes of one group), 8 for E8P)."""
    return _unit_rows(self.kind, self.meta, self.codebook)

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


def _unit_rows(kind, meta, codebook) -> int:
  if kind == "scalar":
    return 1
  if kind == "vq":
    return dict(meta)["dim"]
  if kind == "aqlm":
    return int(codebook.shape[2])
  return e8p_core.CODESZ


def _unpacked(kind, meta, stored, scale, zero, codebook):
  """The ``int32`` codes of a stored container: ``(K, N)`` scalar, ``(K / dim, N)`` VQ,
  ``(I, N, M)`` AQLM, ``(K / 8, N)`` E8P."""
  if kind == "e8p":
    return stored.astype(jnp.int32)
  leaf = _wrap(kind, meta, stored, scale, zero, codebook, None)
  return (leaf.codes() if kind == "scalar" else leaf.code_values()).astype(jnp.int32)


def _stored(leaf):
  """The stored-codes child of a format's leaf (what ``codes0`` holds)."""
  return leaf.packed if isinstance(leaf, formats.QuantizedArray) else leaf.codes


def _wrap(kind, meta, stored, scale, zero, codebook, codes):
  """The format's leaf from stored codes (``stored``) or unpacked ``codes``."""
  m = dict(meta)
  if kind == "scalar":
    packed = stored if codes is None else formats.pack(codes.astype(jnp.uint32), m["bits"],
                                                       axis=0)
    return formats.QuantizedArray(packed, scale, zero, bits=m["bits"],
                                  group_size=m["group_size"], shape=m["shape"],
                                  symmetric=m["symmetric"], dtype=m["dtype"])
  if kind == "aqlm":
    if codes is None:
      return formats.AdditiveCodebookArray(stored, codebook, scale, shape=m["shape"],
                                           dtype=m["dtype"], nbits=m["nbits"])
    return formats.AdditiveCodebookArray.from_codes(codes, codebook, scale, nbits=m["nbits"],
                                                    dtype=m["dtype"])
  if kind == "e8p":
    return formats.E8PArray(stored if codes is None else codes.astype(jnp.uint16), scale,
                            dtype=m["dtype"])
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


def _vectors(latent, rows: int):
  """``(K, N)`` -> ``(K / rows, N, rows)``: the vector of ``rows`` consecutive inputs of each
  output (the AQLM and E8P layout)."""
  k, n = latent.shape
  return jnp.swapaxes(latent.astype(jnp.float32).reshape(k // rows, rows, n), 1, 2)


def _encode(kind, meta, latent, scale, zero, codebook, codes0):
  m = dict(meta)
  prev = _unpacked(kind, meta, codes0, scale, zero, codebook)
  if kind == "scalar":
    return codes_core.scalar_encode(latent, scale, zero, prev, bits=m["bits"],
                                    group_size=m["group_size"], symmetric=m["symmetric"])
  if kind == "aqlm":
    i, n, mm = prev.shape
    s = scale.astype(jnp.float32)
    safe = jnp.where(s == 0, 1.0, s)
    t = _vectors(latent, codebook.shape[2]) / safe[None, :, None]  # (I, N, g)
    new = codes_core.additive_encode(t.reshape(i * n, -1), codebook, prev.reshape(i * n, mm),
                                     beam_size=m["beam_size"]).reshape(i, n, mm)
    return jnp.where((s == 0)[None, :, None], prev, new)
  if kind == "e8p":
    s = scale.astype(jnp.float32)
    x = _vectors(latent, e8p_core.CODESZ) / jnp.where(s == 0, 1.0, s)
    return jnp.where(s == 0, prev, codes_core.e8p_encode(x, prev))
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
  if kind == "aqlm":
    return aqlm_core.decode(codes, codebook.astype(jnp.float32), scale.astype(jnp.float32))
  if kind == "e8p":
    v = e8p_core.decode(codes, jnp.float32)  # (K / 8, N, 8)
    return jnp.swapaxes(v, 1, 2).reshape(k, n) * scale.astype(jnp.float32)
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
  elif kind == "vq":
    dlat = dw
    gk, gn = scale.shape
    unscaled = _decode32(kind, meta, codes, jnp.ones_like(scale, jnp.float32), None, codebook)
    dscale = (dw * unscaled).reshape(gk, k // gk, gn, n // gn).sum((1, 3))
  else:  # aqlm (scales and codebooks) and e8p (the scale): W_hat is linear in each
    dlat = dw
    if kind == "aqlm":
      f = lambda s, c: _decode32(kind, meta, codes, s, None, c)
      _, vjp = jax.vjp(f, scale.astype(jnp.float32), codebook.astype(jnp.float32))
      dscale, dcb = vjp(dw)
      return (dx, dlat.astype(latent.dtype), dscale.astype(scale.dtype), None,
              dcb.astype(codebook.dtype), None)
    unscaled = _decode32(kind, meta, codes, jnp.ones((), jnp.float32), None, None)
    dscale = jnp.sum(dw * unscaled)
  return (dx, dlat.astype(latent.dtype), dscale.astype(scale.dtype), dzero, None, None)


_ste_dot.defvjp(_ste_dot_fwd, _ste_dot_bwd)


def ste_matmul_xla(x: jax.Array, w: STEWeight) -> jax.Array:
  """``x @ W_hat`` (the compressed leaf of the recomputed codes, through :func:`formats.dot`)
  with the straight-through backward pass of the module docstring."""
  return _ste_dot(x, w.latent, w.scale, w.zero, w.codebook, w.codes0, w.kind, w.meta,
                  w.forward_codes == "stored")


formats.register_matmul(STEWeight, "xla", ste_matmul_xla, priority=formats.FALLBACK_PRIORITY)


# --- tree conversion --------------------------------------------------------------------------


def _from_leaf(path: str, leaf, beam_size: int = 1) -> STEWeight:
  codebook, zero = None, getattr(leaf, "zero", None)
  if isinstance(leaf, formats.QuantizedArray):
    for name in ("scale", "zero"):
      v = getattr(leaf, name)
      if isinstance(v, base.CompressedArray):
        raise NotImplementedError(f"to_ste: {path}: {name} is itself compressed "
                                  f"({type(v).__name__}); STE needs plain-array scales/zeros")
    meta = dict(bits=leaf.bits, group_size=leaf.group_size, shape=leaf.shape,
                symmetric=leaf.symmetric, dtype=leaf.dtype.name)
    kind, scale = "scalar", leaf.scale
  elif isinstance(leaf, formats.VQArray):
    meta = dict(dim=leaf.dim, code_bits=leaf.code_bits, group_size=leaf.group_size,
                out_block=leaf.out_block, shape=leaf.shape, dtype=leaf.dtype.name)
    kind, codebook, scale = "vq", leaf.codebook, leaf.scale
  elif isinstance(leaf, formats.AdditiveCodebookArray):
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
      raise ValueError(f"to_ste: beam_size must be an int >= 1, got {beam_size!r}")
    meta = dict(nbits=leaf.nbits, shape=leaf.shape, dtype=leaf.dtype.name, beam_size=beam_size)
    kind, codebook, scale = "aqlm", leaf.codebooks, leaf.scales
  elif isinstance(leaf, formats.E8PArray):
    meta = dict(shape=leaf.shape, dtype=leaf.dtype.name)
    kind, scale = "e8p", leaf.scale
  else:
    raise NotImplementedError(
        f"to_ste: {path} is a {type(leaf).__name__}; straight-through training supports "
        "QuantizedArray, VQArray, AdditiveCodebookArray, E8PArray and Incoherent leaves of "
        "these (select other leaves out with `where`)")
  meta = tuple(sorted(meta.items()))
  stored = _stored(leaf)
  codes = _unpacked(kind, meta, stored, scale, zero, codebook)
  latent = _decode32(kind, meta, codes, scale, zero, codebook)
  w = STEWeight(latent, scale, zero, codebook, stored, kind=kind, meta=meta)
  again = w.codes()
  if not bool(jnp.array_equal(again, codes)):
    bad = int(jnp.sum(again != codes))
    raise AssertionError(f"to_ste: {path}: re-encoding the decoded weight changed {bad} of "
                         f"{codes.size} codes (the forward pass would not be the compressed "
                         "model's)")
  return w


def to_ste(params: Any, where: Selector = None, forward_codes: str = "latent",
           beam_size: int = 1) -> Any:
  """``params`` with each compressed leaf selected by ``where`` (default: all) replaced by an
  :class:`STEWeight` whose codes, re-encoded from its latent, equal the stored codes (checked:
  the forward pass starts as the compressed model's, exactly). An
  :class:`~compressjax.formats.Incoherent` leaf keeps its rotations and gets the
  :class:`STEWeight` of its inner leaf. ``beam_size``: the AQLM encoder's beam
  (:func:`codes_core.additive_encode`; other formats ignore it).

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
      if isinstance(leaf, formats.Incoherent) and isinstance(leaf.inner, base.CompressedArray):
        inner = dataclasses.replace(_from_leaf(f"{path} (Incoherent inner)", leaf.inner,
                                               beam_size), forward_codes=forward_codes)
        return dataclasses.replace(leaf, inner=inner)
      return dataclasses.replace(_from_leaf(path, leaf, beam_size), forward_codes=forward_codes)
    return leaf

  out = map_with_path(one, params)
  if not hits[0]:
    raise ValueError(f"to_ste: where={where!r} matched no compressed leaf")
  return out


def export(params: Any) -> Any:
  """The tree with every :class:`STEWeight` turned back into its original format, codes
  recomputed from its latent (what its forward pass used)."""
  return jax.tree.map(lambda x: x.compressed() if is_ste(x) else x, params, is_leaf=is_ste)
