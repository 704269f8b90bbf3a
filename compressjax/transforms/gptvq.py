"""GPTVQ transform (tree wiring; the math lives in :mod:`compressjax.quantize.gptvq_core`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from compressjax.formats import VQArray
from compressjax.quantize import gptvq_core, obs_core
from compressjax.transforms.base import DEFAULT_WHERE, Transform, leafwise
from compressjax.transforms.quantize import _check_dense_2d, check_damping, check_positive_int
from compressjax.transforms.selection import Selector

__all__ = ["gptvq"]


def gptvq(dim: int = 2, bits: float = 2, group_size: int | None = 64, *,
          out_block: int | None = 64, kmeans_iters: int = 10, codebook_bits: int = 8,
          m_step_iters: int = 0, m_step_lr: float = 1e-3, blocksize: int = 128,
          percdamp: float = 0.01, scale_dtype=jnp.float16,
          where: Selector = DEFAULT_WHERE) -> Transform:
  """GPTVQ vector quantization of the selected kernels into :class:`~compressjax.formats.VQArray`.

  Data-aware: needs each layer's input Hessian (run through
  :func:`compressjax.calibration.run_sequential` or the ``compress`` entry point).

  Args:
    dim: vector dimension ``d`` (1, 2, 4, 8): ``d`` consecutive input rows of one output.
    bits: bits per dimension (the paper's knob): ``2**(dim * bits)`` codewords per codebook.
    group_size: input rows per codebook (``None``: all); a multiple of ``dim`` dividing ``K``.
    out_block: outputs per codebook (``None``: all); divides ``N``.
    kmeans_iters: Hessian-weighted EM iterations per codebook.
    codebook_bits: integer width of the stored centroids (int8 container).
    m_step_iters: Adam steps of the codebook M-step after the sweep (0: none).
    m_step_lr: its learning rate.
    blocksize: rows per lazy batch update (a multiple of ``dim``).
    percdamp: relative damping of the Hessian.
    scale_dtype: dtype of the per-codebook scales.
    where: which parameters (default: linear kernels, or what the enclosing rule selected).

  Stored bits per parameter: ``dim * bits`` per vector in the codes' container
  (bit-packed below 8 bits) plus ``(2**(dim*bits) * dim * 8 + 16) / (group_size * out_block)``
  for the codebooks (:func:`compressjax.quantize.gptvq_core.bits_per_param`).

  References:
    van Baalen et al. 2024, GPTVQ: The Blessing of Dimensionality for LLM Quantization,
    arXiv:2402.15319.
  """
  name = "gptvq"
  if dim not in gptvq_core.VQ_DIMS:
    raise ValueError(f"{name}: dim must be one of {gptvq_core.VQ_DIMS}, got {dim!r}")
  cb = dim * bits if isinstance(bits, (int, float)) and not isinstance(bits, bool) else None
  if cb is None or bits <= 0 or abs(cb - round(cb)) > 1e-9 or not 1 <= round(cb) <= 16:
    raise ValueError(f"{name}: bits (per dimension) must make dim * bits an integer in 1..16 "
                     f"(dim={dim}), got bits={bits!r}")
  check_positive_int(name, "group_size", group_size, optional=True)
  check_positive_int(name, "out_block", out_block, optional=True)
  check_positive_int(name, "blocksize", blocksize)
  check_damping(name, percdamp)
  if group_size is not None and group_size % dim:
    raise ValueError(f"{name}: group_size={group_size} must be a multiple of dim={dim}")
  if blocksize % dim:
    raise ValueError(f"{name}: blocksize={blocksize} must be a multiple of dim={dim}")
  if isinstance(kmeans_iters, bool) or not isinstance(kmeans_iters, int) or kmeans_iters < 0:
    raise ValueError(f"{name}: kmeans_iters must be an int >= 0, got {kmeans_iters!r}")
  if isinstance(m_step_iters, bool) or not isinstance(m_step_iters, int) or m_step_iters < 0:
    raise ValueError(f"{name}: m_step_iters must be an int >= 0, got {m_step_iters!r}")
  if isinstance(codebook_bits, bool) or not isinstance(codebook_bits, int) or not (
      2 <= codebook_bits <= 8):
    raise ValueError(f"{name}: codebook_bits must be an int in 2..8, got {codebook_bits!r}")
  kw = dict(dim=dim, bits=bits, group_size=group_size, out_block=out_block,
            kmeans_iters=kmeans_iters, codebook_bits=codebook_bits, blocksize=blocksize,
            percdamp=percdamp, m_step_iters=m_step_iters, m_step_lr=m_step_lr,
            scale_dtype=scale_dtype)
  quant = jax.jit(functools.partial(gptvq_core.gptvq_quantize, **kw))
  label = f"gptvq(dim={dim}, bits={bits}, group_size={group_size}, out_block={out_block})"

  def fn(path, w, stats):
    del path
    _check_dense_2d(w, name)
    k, n = w.shape
    gs, ob = gptvq_core.check_vq_args(k, n, dim=dim, bits=bits, group_size=group_size,
                                      out_block=out_block, codebook_bits=codebook_bits,
                                      kmeans_iters=kmeans_iters, blocksize=blocksize, name=name)
    # On a mesh (``stats.columns``): each device solves its share of the output columns, the
    # codebook statistics all-reduced; the leaf's codes stay split P(None, axes).
    split = getattr(stats, "columns", None)
    if split is not None and n % split.size:
      split = None
    if split is None:
      codes, codebook, scale, info = quant(w, stats.gptq_hessian())
    else:
      codes, codebook, scale, info = gptvq_core.gptvq_quantize(w, stats.gptq_hessian(),
                                                               split=split, **kw)
    if not isinstance(info["loss"], jax.core.Tracer) and not jnp.isfinite(info["loss"]):
      raise ValueError("the GPTVQ solver's loss is not finite (a degenerate Hessian?)")
    return obs_core.place_leaf(VQArray.from_codes(codes, codebook, scale, dim=dim, group_size=gs,
                                                  out_block=ob, dtype=w.dtype), split)

  return leafwise(fn, where, name=label, with_stats=True)
