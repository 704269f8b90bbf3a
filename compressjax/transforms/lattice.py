"""Lattice-codebook quantization transforms (tree wiring; the math is in
:mod:`compressjax.quantize.e8p_core`)."""

from __future__ import annotations

import functools
import math

import jax

from compressjax.formats.e8p import E8PArray, e8p_rvq
from compressjax.quantize import e8p_core, obs_core
from compressjax.transforms.base import DEFAULT_WHERE, Transform, leafwise
from compressjax.transforms.quantize import _check_dense_2d, check_damping, check_positive_int
from compressjax.transforms.selection import Selector

__all__ = ["e8p"]


def e8p(percdamp: float = 0.01, blocksize: int = 128, *, bits: int = 2,
        scale_override: float | None = None, resid_scale: float | None = None,
        tune_iters: int = 0, where: Selector = DEFAULT_WHERE) -> Transform:
  """QuIP#'s E8P lattice codebook with BlockLDLQ at 2, 3 or 4 bits per weight.

  Each selected ``(K, N)`` kernel (``K`` a multiple of 8) is scaled by
  ``RMS(W) / scale_override`` and rounded 8 input rows at a time with BlockLDLQ error feedback
  under the layer's Hessian (``stats.gptq_hessian()``); needs calibration statistics. The
  codebook: ``bits=2`` E8P (:class:`E8PArray` leaves); ``bits=3`` QuIP#'s E8P12RVQ3B, E8P plus
  the 1-bit E8 codebook on the residual magnified by ``resid_scale``; ``bits=4`` E8P12RVQ4B,
  E8P plus a second E8P on the residual (:func:`compressjax.quantize.e8p_core.rvq_quantize`;
  :func:`compressjax.formats.e8p_rvq` leaves, a sum of two lattice leaves). QuIP# applies it to
  incoherence-processed weights: chain the incoherence transform in front (on raw weights with
  outliers one per-layer scale fits badly).

  Args:
    percdamp: relative damping of the Hessian (>= 0).
    blocksize: rows per lazy batch update, a positive multiple of 8.
    bits: 2, 3 or 4.
    scale_override: ``Wscale = RMS(W) / scale_override``; default per ``bits`` the reference's
      (2: 0.9, the ``--scale_override`` of its E8P12 scripts; 3: 0.98 and 4: 1.03, the
      codebooks' ``opt_scale``; :data:`e8p_core.RVQ_DEFAULTS`).
    resid_scale: residual magnification for ``bits`` 3 and 4 (default 2.04 and 3.45, the
      codebooks' ``opt_resid_scale``); must be ``None`` for 2 bits.
    tune_iters: extra block coordinate-descent passes after BlockLDLQ (the reference's
      ``quip_tune_iters``; 0 = plain BlockLDLQ).
    where: which parameters (default: every linear kernel of the decoder blocks, or what the
      enclosing :func:`select` rule selected).

  References:
    Tseng et al. 2024, QuIP# (arXiv:2402.04396): Sec. 4.2 (E8P), Alg. 3 (BlockLDLQ), residual
    vector quantization for 3 and 4 bits (quip-sharp ``latticee8_padded12_rvq{3,4}bit.py``).
  """
  name = "e8p"
  check_damping(name, percdamp)
  check_positive_int(name, "blocksize", blocksize)
  if blocksize % e8p_core.CODESZ:
    raise ValueError(f"{name}: blocksize must be a multiple of {e8p_core.CODESZ}, "
                     f"got {blocksize!r}")
  if isinstance(bits, bool) or bits not in e8p_core.RVQ_DEFAULTS:
    raise ValueError(f"{name}: bits must be 2 (E8P), 3 (E8P + E81B) or 4 (E8P + E8P), "
                     f"got {bits!r}")
  so_default, rs_default = e8p_core.RVQ_DEFAULTS[bits]
  scale_override = so_default if scale_override is None else scale_override
  for arg, v in (("scale_override", scale_override), ("resid_scale", resid_scale)):
    if v is None:
      continue
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
      raise ValueError(f"{name}: {arg} must be a finite float > 0, got {v!r}")
  if bits == 2 and resid_scale is not None:
    raise ValueError(f"{name}: resid_scale applies to bits=3 or 4 (a residual stage), "
                     f"got resid_scale={resid_scale!r} with bits=2")
  if isinstance(tune_iters, bool) or not isinstance(tune_iters, int) or tune_iters < 0:
    raise ValueError(f"{name}: tune_iters must be an int >= 0, got {tune_iters!r}")
  if bits == 2:
    quant = functools.partial(e8p_core.e8p_quantize, percdamp=float(percdamp),
                              blocksize=blocksize, scale_override=float(scale_override),
                              tune_iters=tune_iters)
  else:
    rs = float(rs_default if resid_scale is None else resid_scale)
    quant = functools.partial(e8p_core.rvq_quantize, bits=bits, percdamp=float(percdamp),
                              blocksize=blocksize, scale_override=float(scale_override),
                              resid_scale=rs, tune_iters=tune_iters)

  def fn(path, w, stats):
    del path
    _check_dense_2d(w, name)
    if w.shape[0] % e8p_core.CODESZ:
      raise ValueError(f"{name}: the input width K={w.shape[0]} of a {tuple(w.shape)} kernel "
                       f"is not a multiple of {e8p_core.CODESZ}")
    # On a mesh (``stats.columns``): each device solves its share of the output columns (the
    # same codes and scale as one device); the leaf's codes stay split P(None, axes).
    split = _lattice_split(w.shape[1], getattr(stats, "columns", None))
    *codes, scale, info = quant(w, stats.gptq_hessian(), split=split)
    if not isinstance(info["loss"], jax.core.Tracer) and not bool(info["cholesky_ok"]):
      raise ValueError("the Hessian could not be factorised at any damping (NaNs?)")
    if bits == 2:
      return obs_core.place_leaf(E8PArray(codes[0], scale, dtype=w.dtype), split)
    return obs_core.place_leaf(e8p_rvq(codes[0], codes[1], scale, rs, dtype=w.dtype), split)

  label = f"e8p(percdamp={percdamp}, blocksize={blocksize}" + (f", bits={bits})" if bits != 2
                                                                 else ")")
  return leafwise(fn, where, name=label, with_stats=True)


def _lattice_split(n: int, split):
  """The engine's column split of an ``n``-column kernel, or ``None`` (solve it whole) when the
  columns do not divide evenly over it."""
  return split if split is not None and n % split.size == 0 else None
