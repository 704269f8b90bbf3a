"""What the Pallas kernels share: per-target block sizes, activation layout, the reference VJP.

Every kernel here multiplies ``x (M, K)`` by a compressed ``(K, N)`` weight whose codes are laid
out so that one *code plane* ``c`` (code ``c`` of every block of ``p`` consecutive inputs) is a
plain ``(K / p, N)`` matrix once unpacked with shifts and masks. The activations are permuted
to match (:func:`plane_major`, cheap: ``x`` is small), so that

    y = sum_c  x[:, c::p] @ decode_plane_c(codes)

is a sum of ordinary tile products, with no reshape or gather of the weight inside a kernel.
The grid runs over (row blocks, column blocks); each program loops over ``K`` in steps that
never cross a scale group and accumulates in ``float32``.

References:
  Pallas ``pallas_call`` / ``BlockSpec`` (JAX docs, "Pallas quickstart"); the tiling of
  ``jax/experimental/pallas/ops/tpu/matmul.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["CONFIGS", "KernelConfig", "config_for", "differentiable_factory", "plane_major",
           "with_reference_vjp"]


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Block sizes of one target.

  Attributes:
    block_m: activation rows per program (rows are zero-padded to a multiple of it).
    block_n: output columns per program; ``N`` need not be a multiple (edge blocks are masked).
    block_k: most inputs (weights along ``K``) decoded per loop step; a step never crosses a
      scale group: it is the largest power of 2 <= ``block_k`` dividing the group size.
    use_dot: tile products with ``jnp.dot`` (tensor cores / MXU); ``False`` uses a broadcast
      multiply and sum; ``None`` picks per tile: a dot when every dimension is >= 16 (Triton's
      minimum), else the broadcast (decode rows).
    num_warps, num_stages: Triton launch parameters (GPU only).
  """

  block_m: int
  block_n: int
  block_k: int
  use_dot: bool | None = True
  num_warps: int = 4
  num_stages: int = 2


#: One config per target. "interpret" keeps blocks small so CPU tests cover several programs
#: and ragged edges.
CONFIGS: dict[str, KernelConfig] = {
    "gpu": KernelConfig(block_m=64, block_n=128, block_k=512, use_dot=None),
    "tpu": KernelConfig(block_m=8, block_n=256, block_k=1024, use_dot=True),
    "interpret": KernelConfig(block_m=8, block_n=128, block_k=256, use_dot=True),
}

_BACKEND_TARGET = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


def target(interpret: bool) -> str | None:
  """``"interpret"`` when asked, else the target of the default backend (``None`` on CPU)."""
  if interpret:
    return "interpret"
  return _BACKEND_TARGET.get(jax.default_backend())


def config_for(interpret: bool, config: KernelConfig | None = None) -> KernelConfig:
  """The given ``config`` or the one of the current target.

  Raises:
    NotImplementedError: on a backend with no kernel target (CPU without ``interpret``).
  """
  if config is not None:
    return config
  t = target(interpret)
  if t is None:
    raise NotImplementedError(
        f"Pallas kernels need a GPU or TPU backend (got {jax.default_backend()!r}); pass "
        f"interpret=True to run them in the Pallas interpreter.")
  return CONFIGS[t]


def compiler_params(interpret: bool, config: KernelConfig, target_name: str | None = None):
  """Backend compiler parameters: Triton on GPU (Pallas' Mosaic GPU ``pallas_call`` lowering
  rejects these tiles, see README), ``parallel`` grid axes on TPU, nothing when interpreting."""
  if interpret:
    return None
  t = target_name or target(False)
  if t == "gpu":
    from jax.experimental.pallas import triton as pltr  # pylint: disable=g-import-not-at-top
    return pltr.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
  if t == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
  return None


def step_size(group: int, block_k: int) -> int:
  """Inputs per loop step: the largest power of 2 that divides ``group`` and is at most
  ``block_k`` (so a step never crosses a group and its tiles are powers of 2)."""
  step = 1
  while step * 2 <= block_k and group % (step * 2) == 0:
    step *= 2
  return step


def round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def pow2_at_least(a: int) -> int:
  return 1 << max(0, int(a) - 1).bit_length()


def block_cols(n: int, block_n: int) -> int:
  """Columns per program: ``block_n``, or the power of 2 covering a narrower ``N``."""
  return min(block_n, pow2_at_least(n))


def as_rows(x: jax.Array, block_m: int) -> tuple[jax.Array, int, int]:
  """``x (..., K)`` -> ``(Mp, K)`` zero-padded rows, the true row count ``M`` and ``bm``."""
  k = x.shape[-1]
  m = math.prod(x.shape[:-1])
  x2 = x.reshape(m, k)
  bm = min(block_m, pow2_at_least(max(m, 8)))  # Triton tiles are powers of 2; TPU needs 8 | bm
  mp = round_up(m, bm)
  if mp != m:
    x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
  return x2, m, bm


def plane_major(x2: jax.Array, p: int) -> jax.Array:
  """``(M, K)`` -> ``(p, M, K // p)`` with ``out[c, m, b] = x[m, b * p + c]``."""
  m, k = x2.shape
  return jnp.transpose(x2.reshape(m, k // p, p), (2, 0, 1))


def mac(xc: jax.Array, wc: jax.Array, use_dot: bool | None) -> jax.Array:
  """``xc (bm, t) @ wc (t, bn)`` in ``float32`` (``use_dot``: see :class:`KernelConfig`)."""
  if use_dot is None:
    use_dot = min(xc.shape + wc.shape) >= 16
  if use_dot:
    return jnp.dot(xc, wc, preferred_element_type=jnp.float32)
  return jnp.sum(xc.astype(jnp.float32)[:, :, None] * wc.astype(jnp.float32)[None, :, :], axis=1)


def compute_dtype(x_dtype: Any, out_dtype: Any) -> Any:
  """Dtype the tiles are multiplied in: the output dtype when it is a float of >= 16 bits."""
  d = jnp.dtype(out_dtype)
  return d if jnp.issubdtype(d, jnp.floating) and d.itemsize >= 2 else jnp.dtype(jnp.float32)


def differentiable_factory(forward: Callable, reference: Callable) -> Callable:
  """A cached ``(interpret, config, target_name) -> f(x, w)``: the jitted ``forward`` kernel
  (called with those keyword arguments) whose gradient is ``reference``'s
  (:func:`with_reference_vjp`); one compiled function per setting."""

  @functools.lru_cache(maxsize=None)
  def make(interpret: bool, config: KernelConfig | None, target_name: str | None):
    return with_reference_vjp(
        jax.jit(functools.partial(forward, interpret=interpret, config=config,
                                  target_name=target_name)), reference)

  return make


def with_reference_vjp(forward: Callable, reference: Callable) -> Callable:
  """``f(x, w) = forward(x, w)`` whose gradient is that of ``reference(x, w)``.

  The backward pass decodes through the pure-jnp reference: ``dx = g @ W^T`` and the continuous
  children of ``w`` (scales, zeros, codebooks) get their gradients from it; integer children
  get ``float0`` cotangents.
  """

  # The custom_vjp sees the leaves of ``w``, never ``w`` itself: a format whose constructor
  # checks dtypes could not be rebuilt around the ``float0`` cotangents of its integer codes.
  def f(x, w):
    leaves, treedef = jax.tree_util.tree_flatten(w)
    return _leafwise(treedef)(x, *leaves)

  @functools.lru_cache(maxsize=None)
  def _leafwise(treedef):
    unflatten = functools.partial(jax.tree_util.tree_unflatten, treedef)

    @jax.custom_vjp
    def g(x, *leaves):
      return forward(x, unflatten(leaves))

    def fwd(x, *leaves):
      return forward(x, unflatten(leaves)), (x, leaves)

    def bwd(res, ct):
      x, leaves = res
      _, vjp = jax.vjp(lambda x, *ls: reference(x, unflatten(ls)), x, *leaves)
      return vjp(ct)

    g.defvjp(fwd, bwd)
    return g

  return f
