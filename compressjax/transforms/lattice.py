"""Lattice-codebook quantization transforms (tree wiring; the math is in
:mod:`compressjax.quantize.e8p_core`)."""

from __future__ import annotations

import functools
import math

import jax

from compressjax.formats.e8p import E8PArray
from compressjax.quantize import e8p_core
from compressjax.transforms.base import DEFAULT_WHERE, Transform, leafwise
from compressjax.transforms.quantize import _check_dense_2d, check_damping, check_positive_int
from compressjax.transforms.selection import Selector

__all__ = ["e8p"]


def e8p(percdamp: float = 0.01, blocksize: int = 128, *,
        scale_override: float = e8p_core.DEFAULT_SCALE_OVERRIDE, tune_iters: int = 0,
        where: Selector = DEFAULT_WHERE) -> Transform:
  """QuIP#'s E8P lattice codebook with BlockLDLQ: 2 bits per weight, :class:`E8PArray` leaves.

  Each selected ``(K, N)`` kernel (``K`` a multiple of 8) is scaled by
  ``RMS(W) / scale_override`` and rounded 8 input rows at a time to the E8P codebook with
  BlockLDLQ error feedback under the layer's Hessian (``stats.gptq_hessian()``); needs
  calibration statistics. QuIP# applies it to incoherence-processed weights: chain the
  incoherence transform in front (on raw weights with outliers one per-layer scale fits badly).

  Args:
    percdamp: relative damping of the Hessian (>= 0).
    blocksize: rows per lazy batch update, a positive multiple of 8.
    scale_override: ``Wscale = RMS(W) / scale_override`` (QuIP#'s E8P12 scripts use 0.9).
    tune_iters: extra block coordinate-descent passes after BlockLDLQ (the reference's
      ``quip_tune_iters``; 0 = plain BlockLDLQ).
    where: which parameters (default: every linear kernel of the decoder blocks, or what the
      enclosing :func:`select` rule selected).

  References:
    Tseng et al. 2024, QuIP# (arXiv:2402.04396): Sec. 4.2 (E8P), Alg. 3 (BlockLDLQ).
  """
  name = "e8p"
  check_damping(name, percdamp)
  check_positive_int(name, "blocksize", blocksize)
  if blocksize % e8p_core.CODESZ:
    raise ValueError(f"{name}: blocksize must be a multiple of {e8p_core.CODESZ}, "
                     f"got {blocksize!r}")
  if isinstance(scale_override, bool) or not isinstance(scale_override, (int, float)) or not (
      0 < scale_override < math.inf):
    raise ValueError(f"{name}: scale_override must be a finite float > 0, got "
                     f"{scale_override!r}")
  if isinstance(tune_iters, bool) or not isinstance(tune_iters, int) or tune_iters < 0:
    raise ValueError(f"{name}: tune_iters must be an int >= 0, got {tune_iters!r}")
  quant = functools.partial(e8p_core.e8p_quantize, percdamp=float(percdamp),
                            blocksize=blocksize, scale_override=float(scale_override),
                            tune_iters=tune_iters)

  def fn(path, w, stats):
    del path
    _check_dense_2d(w, name)
    if w.shape[0] % e8p_core.CODESZ:
      raise ValueError(f"{name}: the input width K={w.shape[0]} of a {tuple(w.shape)} kernel "
                       f"is not a multiple of {e8p_core.CODESZ}")
    codes, scale, info = quant(w, stats.gptq_hessian())
    if not isinstance(info["loss"], jax.core.Tracer) and not bool(info["cholesky_ok"]):
      raise ValueError("the Hessian could not be factorised at any damping (NaNs?)")
    return E8PArray(codes, scale, dtype=w.dtype)

  return leafwise(fn, where, name=f"e8p(percdamp={percdamp}, blocksize={blocksize})",
                  with_stats=True)
