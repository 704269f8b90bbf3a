"""The single dispatch point for products with (possibly compressed) weights.

Every matmul with a weight goes through :func:`dot`. Dense weights use
``jnp.matmul``; a compressed leaf is multiplied by the first registered
implementation for its format that applies:

* implementations are tried in decreasing ``priority``, then in registration
  order; the pure-jnp ``"xla"`` implementation is registered for every built-in
  format with :data:`FALLBACK_PRIORITY` so that kernels registered later (e.g.
  ``"pallas"`` with the default priority 0) are tried first;
* an implementation whose ``can_use(x, w)`` predicate returns ``False`` is
  skipped, and one that raises :class:`NotImplementedError` (e.g. an
  unsupported tile shape) passes to the next;
* ``implementation="name"`` forces one implementation.

Implementations are chosen at trace time from static shapes and dtypes, so the
choice costs nothing under :func:`jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from compressjax.formats import base
from compressjax.formats import quantized
from compressjax.formats import tiled

__all__ = [
    "FALLBACK_PRIORITY",
    "MatmulImpl",
    "dot",
    "implementations",
    "materialize",
    "register_matmul",
]

#: Priority of the always-available pure-jnp ``"xla"`` implementations.
FALLBACK_PRIORITY = -100

MatmulFn = Callable[[jax.Array, Any], jax.Array]
CanUseFn = Callable[[jax.Array, Any], bool]


@dataclasses.dataclass(frozen=True)
class MatmulImpl:
  """One registered implementation of ``x @ W`` for a compressed format.

  Attributes:
    name: implementation name, e.g. ``"xla"`` or ``"pallas"``.
    fn: ``fn(x, w) -> y`` with ``x`` of shape ``(..., K)`` and ``y`` of shape
      ``(..., N)`` in ``jnp.result_type(x.dtype, w.dtype)``. May raise
      :class:`NotImplementedError` for inputs it does not support.
    can_use: optional cheap static predicate ``can_use(x, w) -> bool``.
    priority: higher is tried first.
    order: registration counter, breaks priority ties (earlier first).
  """

  name: str
  fn: MatmulFn
  can_use: CanUseFn | None
  priority: int
  order: int


_REGISTRY: dict[type, dict[str, MatmulImpl]] = {}
_COUNTER = [0]


def register_matmul(format_cls: type, name: str, fn: MatmulFn, *,
                    can_use: CanUseFn | None = None, priority: int = 0) -> None:
  """Registers ``fn`` as implementation ``name`` of ``x @ w`` for ``format_cls``.

  Registering an existing ``(format_cls, name)`` pair replaces it.

  Args:
    format_cls: a :class:`~compressjax.formats.CompressedArray` subclass.
      Subclasses of it inherit the registration unless they have their own.
    name: implementation name, used by ``dot(..., implementation=name)``.
    fn: ``fn(x, w) -> y``; may raise :class:`NotImplementedError`.
    can_use: optional static predicate ``can_use(x, w) -> bool``; ``False``
      skips this implementation during automatic selection.
    priority: implementations with higher priority are tried first; the
      built-in ``"xla"`` ones use :data:`FALLBACK_PRIORITY`.

  Raises:
    TypeError: if ``format_cls`` is not a ``CompressedArray`` subclass or
      ``fn`` is not callable.
  """
  if not (isinstance(format_cls, type) and issubclass(format_cls, base.CompressedArray)):
    raise TypeError(f"format_cls must be a CompressedArray subclass, got {format_cls!r}.")
  if not callable(fn):
    raise TypeError(f"fn must be callable, got {fn!r}.")
  _COUNTER[0] += 1
  _REGISTRY.setdefault(format_cls, {})[name] = MatmulImpl(
      name=name, fn=fn, can_use=can_use, priority=int(priority), order=_COUNTER[0])


def unregister_matmul(format_cls: type, name: str) -> bool:
  """Removes implementation ``name`` of ``format_cls`` (``True`` if it was registered)."""
  impls = _REGISTRY.get(format_cls, {})
  return impls.pop(name, None) is not None


def implementations(format_cls: type) -> list[MatmulImpl]:
  """Returns the implementations for ``format_cls`` in the order they are tried.

  The registrations of the nearest class in ``format_cls.__mro__`` that has any
  are used.
  """
  for klass in format_cls.__mro__:
    impls = _REGISTRY.get(klass)
    if impls:
      return sorted(impls.values(), key=lambda i: (-i.priority, i.order))
  return []


def _known_names() -> list[str]:
  return sorted({"xla"} | {name for impls in _REGISTRY.values() for name in impls})


def materialize(w: Any) -> jax.Array:
  """Returns ``w`` as a dense array: compressed leaves are materialized.

  Examples:
    >>> import jax.numpy as jnp
    >>> materialize(jnp.ones((2, 2))).shape
    (2, 2)
  """
  if isinstance(w, base.CompressedArray):
    return w.materialize()
  return w


def dot(x: jax.Array, w: Any, *, implementation: str | None = None,
        prefer: str | None = None) -> jax.Array:
  """Computes ``x @ W`` for a dense or compressed ``(K, N)`` weight ``W``.

  Args:
    x: activations of shape ``(..., K)``.
    w: a dense ``(K, N)`` array or a compressed leaf with ``shape == (K, N)``.
    implementation: ``None`` to pick automatically, or the name of one
      registered implementation to force it. Dense weights always use
      ``jnp.matmul`` (any known name is accepted for them).
    prefer: ``None``, or an implementation name tried first where it is registered for the
      format and its ``can_use`` accepts the input, the automatic order otherwise (a model-wide
      choice, e.g. ``LlamaConfig.matmul_implementation``, that formats without that
      implementation do not refuse). Ignored when ``implementation`` is given.

  Returns:
    ``(..., N)`` array in ``jnp.result_type(x.dtype, w.dtype)``.

  Raises:
    ValueError: on a ``K`` mismatch or an unknown ``implementation`` (the
      message lists the known names).
    NotImplementedError: if no implementation applies to this format/input.

  Examples:
    >>> import jax.numpy as jnp
    >>> from compressjax.formats import QuantizedArray
    >>> codes = jnp.full((32, 4), 3, jnp.uint8)
    >>> w = QuantizedArray.from_codes(codes, jnp.ones((1, 4), jnp.float16), None, bits=2,
    ...                               group_size=32, symmetric=True)
    >>> dot(jnp.ones((2, 32)), w).tolist()
    [[32.0, 32.0, 32.0, 32.0], [32.0, 32.0, 32.0, 32.0]]
    >>> dot(jnp.ones((2, 32)), w, implementation="xla").shape
    (2, 4)
  """
  for name, value in (("implementation", implementation), ("prefer", prefer)):
    if value is not None and value not in _known_names():
      raise ValueError(f"unknown {name}={value!r}; known implementations are "
                       f"{_known_names()}.")
  if not isinstance(w, base.CompressedArray):
    if x.shape[-1] != w.shape[0]:
      raise ValueError(f"x.shape[-1]={x.shape[-1]} does not match w.shape[0]={w.shape[0]}.")
    return jnp.matmul(x, w)
  if len(w.shape) != 2:
    raise ValueError(f"compressed weights must be 2-D (K, N), got shape={w.shape}.")
  if x.shape[-1] != w.shape[0]:
    raise ValueError(f"x.shape[-1]={x.shape[-1]} does not match w.shape[0]={w.shape[0]}.")
  impls = implementations(type(w))
  fmt = type(w).__name__
  if implementation is not None:
    for impl in impls:
      if impl.name == implementation:
        if impl.can_use is not None and not impl.can_use(x, w):
          raise NotImplementedError(
              f"implementation={implementation!r} cannot be used for {fmt} with "
              f"x.shape={x.shape}, x.dtype={x.dtype}, w={w!r}.")
        return impl.fn(x, w)
    raise ValueError(f"implementation={implementation!r} is not registered for {fmt}; "
                     f"registered: {[i.name for i in impls]}.")
  if prefer is not None:
    first = [i for i in impls if i.name == prefer]
    impls = first + [i for i in impls if i.name != prefer]
  reasons = []
  for impl in impls:
    if impl.can_use is not None and not impl.can_use(x, w):
      reasons.append(f"{impl.name}: can_use returned False")
      continue
    try:
      return impl.fn(x, w)
    except NotImplementedError as e:
      reasons.append(f"{impl.name}: {e}")
  raise NotImplementedError(
      f"no matmul implementation applies to {fmt} with x.shape={x.shape}, x.dtype={x.dtype}: "
      f"{reasons or 'none registered'}.")


# ---------------------------------------------------------------------------
# "xla" implementation for QuantizedArray.


def quantized_matmul_xla(x: jax.Array, w: quantized.QuantizedArray) -> jax.Array:
  """Pure-jnp ``x @ w`` for a :class:`~compressjax.formats.QuantizedArray`, tiled over ``K``.

  :func:`compressjax.formats.tiled.tiled_dot`: rows ``[s, s + T)`` of the weight are unpacked
  from their ``T * bits / 32`` words and dequantized with their groups' statistics, then
  ``x[:, s : s + T] @ W[s : s + T]`` accumulates in ``float32`` (or wider). Temporaries are
  ``O(T x N)`` at every row count: the dense ``(K, N)`` weight is never built. The result is cast
  to ``jnp.result_type(x.dtype, w.dtype)``.
  """
  return tiled.tiled_dot(x, w)


register_matmul(quantized.QuantizedArray, "xla", quantized_matmul_xla,
                priority=FALLBACK_PRIORITY)
