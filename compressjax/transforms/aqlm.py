"""AQLM transform (tree wiring; the math lives in :mod:`compressjax.quantize.aqlm_core`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from compressjax.formats import AdditiveCodebookArray
from compressjax.quantize import aqlm_core, obs_core
from compressjax.transforms.base import DEFAULT_WHERE, Transform, leafwise
from compressjax.transforms.quantize import _check_dense_2d
from compressjax.transforms.selection import Selector

__all__ = ["aqlm"]


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < lo or (
      hi is not None and value > hi):
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    raise ValueError(f"aqlm: {name} must be an int {rng}, got {value!r}")


def _dtype(name: str, value):
  try:
    dt = jnp.dtype(value)
  except TypeError as e:
    raise ValueError(f"aqlm: {name} must be a float dtype, got {value!r}") from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"aqlm: {name} must be a float dtype, got {value!r}")
  return dt


def aqlm(num_codebooks: int = 2, nbits: int = 8, in_group_size: int = 8, *,
         beam_size: int = 1, iterations: int = 4, kmeans_iters: int = 6, cg_iters: int = 8,
         seed: int = 0, codebook_dtype="float16", scale_dtype="float16",
         where: Selector = DEFAULT_WHERE) -> Transform:
  """AQLM: each vector of ``in_group_size`` inputs of an output is a sum of ``num_codebooks``
  learned codewords (``2**nbits`` each) times a per-output scale, fitted to the layer's
  calibration Hessian.

  Produces :class:`~compressjax.formats.AdditiveCodebookArray` leaves; needs calibration
  statistics (it uses ``stats.gptq_hessian()``, a multiple of ``X^T X``). Code bits per weight
  are ``num_codebooks * nbits / in_group_size``; the ``float16`` codebooks add
  ``16 * num_codebooks * 2**nbits * in_group_size`` bits per layer and the scales 16 bits per
  output (see the configs ``aqlm_2x8_g8`` / ``aqlm_1x16_g8`` for this model's totals).

  Args:
    num_codebooks: ``M``, codewords summed per vector.
    nbits: ``B``, bits per code (``2**B`` codewords per codebook), 1..16.
    in_group_size: ``g``, inputs per vector; must divide every selected kernel's input width.
    beam_size: hypotheses per output column in the code search (1: coordinate descent).
    iterations: rounds of (beam search, codebook least squares, scales) after the residual
      k-means initialisation (0: plain k-means).
    kmeans_iters: Lloyd iterations per codebook of the initialisation.
    cg_iters: conjugate-gradient iterations per codebook update.
    seed: k-means initialisation seed.
    codebook_dtype, scale_dtype: storage dtypes (a name or a dtype).
    where: which parameters (default: every linear kernel of the decoder blocks, or what the
      enclosing :func:`select` rule selected).

  References:
    Egiazarian et al. 2024, "Extreme Compression of Large Language Models via Additive
    Quantization" (AQLM), arXiv:2401.06118.
  """
  _check_int("num_codebooks", num_codebooks, 1)
  _check_int("nbits", nbits, 1, 16)
  _check_int("in_group_size", in_group_size, 1)
  _check_int("beam_size", beam_size, 1, 2**nbits if isinstance(nbits, int) else None)
  _check_int("iterations", iterations, 0)
  _check_int("kmeans_iters", kmeans_iters, 0)
  _check_int("cg_iters", cg_iters, 0)
  _check_int("seed", seed, 0)
  codebook_dtype = _dtype("codebook_dtype", codebook_dtype)
  scale_dtype = _dtype("scale_dtype", scale_dtype)
  kw = dict(num_codebooks=num_codebooks, nbits=nbits, in_group_size=in_group_size,
            beam_size=beam_size, iterations=iterations, kmeans_iters=kmeans_iters,
            cg_iters=cg_iters, seed=seed, codebook_dtype=codebook_dtype, scale_dtype=scale_dtype)
  quant = jax.jit(functools.partial(aqlm_core.aqlm_quantize, **kw))
  name = f"aqlm({num_codebooks}x{nbits}, in_group_size={in_group_size})"

  def fn(path, w, stats):
    del path
    _check_dense_2d(w, "aqlm")
    if w.shape[0] % in_group_size:
      raise ValueError(f"aqlm: in_group_size={in_group_size} must divide the kernel's input "
                       f"width {w.shape[0]}")
    # On a mesh (``stats.columns``): each device solves its share of the output columns, the
    # codebook statistics all-reduced; codes and scales stay split by output column.
    split = getattr(stats, "columns", None)
    if split is not None and w.shape[1] % split.size:
      split = None
    if split is None:
      b, C, s, info = quant(w, stats.gptq_hessian())
    else:
      b, C, s, info = aqlm_core.aqlm_quantize(w, stats.gptq_hessian(), split=split, **kw)
    err = info["rel_err"][-1]
    if not isinstance(err, jax.core.Tracer) and not jnp.isfinite(err):
      raise ValueError("the AQLM solver's output error is not finite (a degenerate Hessian?)")
    return obs_core.place_leaf(AdditiveCodebookArray.from_codes(b, C, s, nbits=nbits,
                                                                dtype=w.dtype), split)

  return leafwise(fn, where, name=name, with_stats=True)
