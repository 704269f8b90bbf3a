"""QuIP#-style incoherence processing (tree wiring; the math is in
:mod:`compressjax.quantize.hadamard_core`, the format in :mod:`compressjax.formats.incoherent`)."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp

from compressjax.formats import CompressedArray, Incoherent
from compressjax.transforms.base import DEFAULT_WHERE, Transform, leafwise
from compressjax.transforms.selection import Selector

__all__ = ["incoherence", "random_signs"]


def random_signs(seed: int, path: str, k: int, n: int) -> tuple[jax.Array, jax.Array]:
  """``(su, sv)``: +-1 ``float32`` vectors of length ``k`` and ``n`` for parameter ``path``.

  Deterministic: the key is ``fold_in(PRNGKey(seed), crc32(path))``, so every parameter gets its
  own signs and the same ``(seed, path)`` always gives the same ones.
  """
  key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)
  ku, kv = jax.random.split(key)
  su = jnp.where(jax.random.bernoulli(ku, 0.5, (k,)), -1.0, 1.0).astype(jnp.float32)
  sv = jnp.where(jax.random.bernoulli(kv, 0.5, (n,)), -1.0, 1.0).astype(jnp.float32)
  return su, sv


def incoherence(seed: int = 0, *, where: Selector = DEFAULT_WHERE) -> Transform:
  """Replaces each selected dense ``(K, N)`` kernel by ``Incoherent(Wt, su, sv)`` (same function).

  ``W = diag(su) H_in Wt H_out^T diag(sv)`` with random signs ``su``, ``sv`` per parameter
  (:func:`random_signs`) and the Hadamard transforms of
  :mod:`compressjax.quantize.hadamard_core` (``K`` and ``N`` must be sizes it supports: the
  reference model's 576, 192 and 1536 are). The model computes the same outputs (to float
  rounding); ``Wt`` has no outlier entries, so a quantizer chained after it loses less.

  Chain a quantizer after it: every :func:`~compressjax.transforms.leafwise` transform (``rtn``,
  ``gptq``, ``spqr``, ``owq``, ...) sees through an :class:`~compressjax.formats.Incoherent`
  leaf, quantizes ``Wt`` with the rotated calibration statistics
  (:meth:`~compressjax.formats.Incoherent.rotate_stats`) and re-wraps it. Not data-aware
  itself; it runs in the calibration engine like any block-local step.

  Args:
    seed: non-negative int; the signs of parameter ``path`` derive from ``(seed, path)``.
    where: which parameters (default: the decoder's linear kernels, or what the enclosing
      :func:`~compressjax.transforms.select` rule selected).

  Examples:
    >>> import jax.numpy as jnp
    >>> from compressjax import transforms as T
    >>> params = {"layers": {0: {"mlp": {"up_proj": {"kernel": jnp.ones((64, 12))}}}}}
    >>> out, _ = T.apply(T.chain(T.incoherence(seed=0), T.rtn(bits=4)), params)
    >>> w = out["layers"][0]["mlp"]["up_proj"]["kernel"]
    >>> type(w).__name__, type(w.inner).__name__
    ('Incoherent', 'QuantizedArray')

  References:
    Tseng et al. 2024, QuIP# (arXiv:2402.04396), Sec. 3 and Alg. 1 (randomized Hadamard
    transform, ``incoherence_preprocess``).
  """
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ValueError(f"incoherence: seed must be a non-negative int, got {seed!r}")

  def fn(path, w):
    if isinstance(w, CompressedArray):
      raise ValueError(f"incoherence expects a dense kernel but the parameter is already "
                       f"compressed ({type(w).__name__}); put incoherence first in the chain")
    if getattr(w, "ndim", None) != 2:
      raise ValueError(f"incoherence expects a 2-D (in, out) kernel, got shape "
                       f"{getattr(w, 'shape', None)}")
    su, sv = random_signs(seed, path, *w.shape)
    return Incoherent.rotate(w, su, sv)

  return leafwise(fn, where, name=f"incoherence(seed={seed})", see_through=False)
