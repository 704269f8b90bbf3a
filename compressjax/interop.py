"""Compressed kernels in other JAX codebases: Flax Linen ``nn.Dense``, NNX ``nnx.Linear``, ``lax``.

Both Flax layers take the two hooks that decide how their kernel is used, and compressjax
supplies one of each:

* :func:`dot_general` has ``jax.lax.dot_general``'s signature. A dense ``rhs`` goes to
  ``lax.dot_general`` unchanged; a compressed ``rhs`` (a
  :class:`~compressjax.formats.CompressedArray`, or a :class:`LinenKernel` holding one) in the
  layers' contraction ``x[..., K] @ W[K, N]`` goes to :func:`compressjax.formats.dot`, i.e. to
  the format's registered matmul (a Pallas kernel where one applies, else pure XLA).
* :func:`promote_dtype` (Linen's variadic signature) and :func:`nnx_promote_dtype` (NNX's tuple
  signature) cast inputs and bias as Flax does but hand a compressed kernel through untouched:
  Flax's own ``promote_dtype`` calls ``jnp.asarray`` on the kernel, which a compressed leaf
  (a pytree of codes, scales, ...) cannot survive.

NNX keeps the compressed leaf in its ``nnx.Param`` as it is (``Linear`` reads it as
``kernel[...]``, which a compressed leaf answers with itself). Linen needs one more step: on
apply, ``Scope.param`` checks that the first array leaf of a stored parameter has the shape the
initializer would make, which a compressed leaf's first child (packed codes, say) does not have.
:func:`for_linen` therefore wraps each compressed leaf in a :class:`LinenKernel`, a plain Python
object (not a pytree node, so Linen sees one leaf whose ``.shape`` is the logical ``(K, N)``).
Wrap *inside* the jitted function, after the compressed tree crossed the ``jit`` boundary as an
ordinary pytree; :func:`linen_apply` does exactly that.

Calibrated methods (GPTQ, SparseGPT, AWQ, ...) need each layer's input statistics, keyed by the
parameter path of its kernel. :func:`linen_stats` gathers them for every ``nn.Dense`` (an
``nn.intercept_methods`` interceptor ``sow`` s each Dense input, which works under ``jit``;
``capture_intermediates`` only records outputs), :func:`nnx_stats` for every ``nnx.Linear`` (it
swaps each layer's ``dot_general`` for a recording one while it runs, eagerly, and restores it).
Hand the result to :func:`compressjax.transforms.apply` as ``stats``. These statistics are those
of the *uncompressed* model, all layers at once. For a Linen model made of repeated blocks,
:class:`LinenBlocks` is the calibration engine's model interface instead
(:func:`compressjax.calibration.run_sequential`), which feeds each block the outputs of the
already-compressed blocks before it, as it does for compressjax's own Llama.

Examples:
  A two-layer Linen MLP (not compressjax's Llama), compressed with RTN and then with GPTQ from
  statistics gathered on it, run under ``jit`` with compressed leaves:

  >>> import functools, jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> from compressjax import interop, transforms as T
  >>> Dense = functools.partial(nn.Dense, dot_general=interop.dot_general,
  ...                           promote_dtype=interop.promote_dtype)
  >>> class MLP(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     return Dense(16)(nn.gelu(Dense(64)(x)))
  >>> mlp = MLP()
  >>> x = jax.random.normal(jax.random.key(0), (256, 64))
  >>> params = mlp.init(jax.random.key(1), x)["params"]
  >>> q, _ = T.apply(T.rtn(bits=4, group_size=32, where=r".*/kernel"), params)
  >>> type(q["Dense_0"]["kernel"]).__name__
  'QuantizedArray'
  >>> run = jax.jit(lambda p, x: interop.linen_apply(mlp, {"params": p}, x))
  >>> run(q, x).shape
  (256, 16)
  >>> stats = interop.linen_stats(mlp, {"params": params}, [x])
  >>> sorted(stats)
  ['Dense_0/kernel', 'Dense_1/kernel']
  >>> g, _ = T.apply(T.gptq(bits=4, group_size=32, where=r".*/kernel"), params, stats)
  >>> run(g, x).shape
  (256, 16)

References:
  Flax ``linen/linear.py::Dense`` and ``nnx/nn/linear.py::Linear`` (flax 0.12.8): the
  ``dot_general`` and ``promote_dtype`` arguments and ``core/scope.py::Scope.param``'s shape
  check; Frantar et al. 2022, GPTQ (the statistics are its ``X^T X``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax.linen import dtypes as linen_dtypes

from compressjax import blocks as blocks_lib
from compressjax import formats
from compressjax.calibration import LayerStats
from compressjax.transforms.selection import leaves_with_paths
from compressjax.formats.base import CompressedArray

__all__ = [
    "LinenBlocks",
    "LinenKernel",
    "dot_general",
    "for_linen",
    "linen_apply",
    "linen_stats",
    "nnx_promote_dtype",
    "nnx_stats",
    "promote_dtype",
    "unwrap",
]


class LinenKernel:
  """A compressed leaf as Linen's ``Scope.param`` must see it: one leaf of shape ``(K, N)``.

  Invariants: ``array`` is a :class:`~compressjax.formats.CompressedArray`; ``shape``, ``dtype``
  and ``ndim`` are its logical ones. Deliberately *not* a pytree node: it lives only inside a
  traced function (see :func:`for_linen`), never crosses a ``jit`` boundary.
  """

  __slots__ = ("array",)

  def __init__(self, array: CompressedArray):
    if not isinstance(array, CompressedArray):
      raise TypeError(f"LinenKernel wraps a compressed leaf, got {type(array).__name__}")
    self.array = array

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.array.shape)

  @property
  def dtype(self):
    return self.array.dtype

  @property
  def ndim(self) -> int:
    return len(self.array.shape)

  def __getitem__(self, index):
    if index is Ellipsis:
      return self
    raise TypeError(f"a compressed kernel supports only w[...], got index={index!r}")

  def __repr__(self):
    return f"LinenKernel({self.array!r})"


def unwrap(w: Any) -> Any:
  """The compressed leaf inside a :class:`LinenKernel`; anything else unchanged."""
  return w.array if isinstance(w, LinenKernel) else w


def _is_compressed(w: Any) -> bool:
  return isinstance(w, (CompressedArray, LinenKernel))


def for_linen(variables: Any) -> Any:
  """``variables`` with every compressed leaf wrapped in a :class:`LinenKernel`.

  Call it inside the function you ``jit`` (the wrapped tree is not a valid ``jit`` argument),
  right before ``module.apply``; :func:`linen_apply` does both.
  """
  return jax.tree.map(lambda x: LinenKernel(x) if isinstance(x, CompressedArray) else x,
                      variables, is_leaf=lambda x: isinstance(x, CompressedArray))


def linen_apply(module, variables: Any, *args, **kwargs):
  """``module.apply(for_linen(variables), *args, **kwargs)``: jit this, not ``module.apply``."""
  return module.apply(for_linen(variables), *args, **kwargs)


def _dtype_probe(x: Any) -> Any:
  """A 0-d stand-in of a compressed kernel's dtype for dtype inference."""
  return jnp.zeros((), unwrap(x).dtype) if _is_compressed(x) else x


def _promote(args: tuple[Any, ...], dtype, inexact: bool) -> tuple[Any, ...]:
  dtype = linen_dtypes.canonicalize_dtype(*map(_dtype_probe, args), dtype=dtype, inexact=inexact)
  return tuple(x if x is None or _is_compressed(x) else jnp.asarray(x, dtype) for x in args)


def promote_dtype(*args, dtype=None, inexact: bool = True) -> list[Any]:
  """Linen's ``promote_dtype`` (variadic), passing compressed kernels through untouched.

  The common dtype is inferred as Flax does, a compressed kernel counting with its logical
  ``dtype``; every other argument is cast to it with ``jnp.asarray``. :func:`dot_general` casts
  its result to the (promoted) input dtype, so the layer's output dtype is Flax's.
  """
  return list(_promote(args, dtype, inexact))


def nnx_promote_dtype(args, /, *, dtype=None, inexact: bool = True):
  """NNX's ``promote_dtype`` (one tuple argument), passing compressed kernels through untouched."""
  return _promote(tuple(args), dtype, inexact)


_PRECISION_NAMES = {jax.lax.Precision.DEFAULT: "default", jax.lax.Precision.HIGH: "high",
                    jax.lax.Precision.HIGHEST: "highest"}


def _precision_context(precision):
  """``jax.default_matmul_precision`` for a ``lax`` precision argument (a pair: the higher)."""
  if isinstance(precision, (tuple, list)):
    given = [jax.lax.Precision(p) for p in precision if p is not None]
    precision = max(given, key=list(_PRECISION_NAMES).index) if given else None
  if precision is None:
    return contextlib.nullcontext()
  return jax.default_matmul_precision(_PRECISION_NAMES[jax.lax.Precision(precision)])


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                out_sharding=None, **kwargs):
  """``jax.lax.dot_general`` that also accepts a compressed ``rhs``.

  A dense ``rhs`` goes to ``jax.lax.dot_general`` with every argument. A compressed ``rhs`` of
  logical shape ``(K, N)`` is supported in the contraction that ``nn.Dense`` and ``nnx.Linear``
  make, ``dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ()))``, and goes to
  :func:`compressjax.formats.dot`; ``precision`` then becomes
  ``jax.default_matmul_precision`` around it (a pair picks the higher), and the result has
  ``preferred_element_type`` if given, else ``lhs.dtype`` (as ``lax.dot_general`` of two
  arrays of that dtype would).

  Raises:
    NotImplementedError: for a compressed ``rhs`` in another contraction, with an
      ``out_sharding`` or other ``lax.dot_general`` keywords (the message says what is supported).
  """
  if not _is_compressed(rhs):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type,
                               out_sharding=out_sharding, **kwargs)
  w = unwrap(rhs)
  (lc, rc), (lb, rb) = dimension_numbers
  if tuple(lb) or tuple(rb) or tuple(rc) != (0,) or tuple(lc) != (lhs.ndim - 1,):
    raise NotImplementedError(
        f"compressjax.interop.dot_general: a compressed rhs ({type(w).__name__}, shape "
        f"{tuple(w.shape)}) supports only x[..., K] @ W[K, N], i.e. dimension_numbers="
        f"((({lhs.ndim - 1},), (0,)), ((), ())); got dimension_numbers={dimension_numbers!r}")
  if out_sharding is not None or kwargs:
    raise NotImplementedError(
        f"compressjax.interop.dot_general: a compressed rhs supports no out_sharding or extra "
        f"keywords (got out_sharding={out_sharding!r}, {sorted(kwargs)}); shard the compressed "
        "leaf itself (compressjax.formats.tree_shardings)")
  with _precision_context(precision):
    y = formats.dot(lhs, w)
  return y.astype(preferred_element_type or lhs.dtype)


def _accumulate(stats: dict[str, LayerStats], captured: dict[str, list[jax.Array]]) -> None:
  for path, xs in captured.items():
    for x in xs:
      st = stats.get(path)
      stats[path] = (st if st is not None else LayerStats.zeros(x.shape[-1])).add(x)


def linen_stats(module, variables: Any, batches: Iterable[Any], *,
                method: Any = None) -> dict[str, LayerStats]:
  """Input statistics of every ``nn.Dense`` in ``module``, keyed by its kernel's path.

  Runs ``module.apply(variables, batch)`` (jitted once) for each batch while an
  ``nn.intercept_methods`` interceptor sows the input of each ``nn.Dense.__call__`` into an
  ``"interop_inputs"`` collection; the keys are ``"<module path>/kernel"`` relative to the
  ``params`` collection (``"Dense_0/kernel"``, ``"block/up/kernel"``), i.e. the paths
  :func:`compressjax.transforms.apply` sees when given ``variables["params"]``.

  Args:
    module: a Linen module using ``nn.Dense`` (with or without the interop hooks).
    variables: its variables, ``{"params": ...}`` (dense: statistics of the original model).
    batches: iterable of inputs; a tuple is unpacked into positional arguments.
    method: optional method to apply instead of ``__call__``.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      context.module.sow("interop_inputs", "x", args[0])
    return next_fun(*args, **kwargs)

  @jax.jit
  def capture(variables, batch):
    with nn.intercept_methods(interceptor):
      _, state = module.apply(variables, *batch, method=method, mutable=["interop_inputs"])
    return state["interop_inputs"]

  stats: dict[str, LayerStats] = {}
  for batch in batches:
    sown = capture(variables, batch if isinstance(batch, tuple) else (batch,))
    flat = jax.tree_util.tree_flatten_with_path(sown)[0]
    captured: dict[str, list[jax.Array]] = {}
    for kp, x in flat:
      names = [str(getattr(k, "key", k)) for k in kp]
      captured.setdefault("/".join(names[:-2]) + "/kernel", []).append(x)  # drop "x", index
    _accumulate(stats, captured)
  if not stats:
    raise ValueError("linen_stats: the module called no nn.Dense on these batches")
  return stats


def nnx_stats(model, batches: Iterable[Any]) -> dict[str, LayerStats]:
  """Input statistics of every ``nnx.Linear`` in ``model``, keyed by its kernel's path.

  Runs ``model(*batch)`` eagerly for each batch with each ``Linear``'s ``dot_general`` replaced
  by one that records its input (restored afterwards, also on error); the keys are
  ``"<module path>/kernel"`` as in ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``, the paths
  :func:`compressjax.transforms.apply` sees.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  layers = [("/".join(map(str, path)) + "/kernel", m) for path, m in nnx.iter_modules(model)
            if isinstance(m, nnx.Linear)]
  if not layers:
    raise ValueError(f"nnx_stats: {type(model).__name__} contains no nnx.Linear")
  captured: dict[str, list[jax.Array]] = {}
  saved = [m.dot_general for _, m in layers]

  def recorder(path, inner):
    def dg(lhs, rhs, *args, **kwargs):
      captured.setdefault(path, []).append(lhs)
      return inner(lhs, rhs, *args, **kwargs)
    return dg

  stats: dict[str, LayerStats] = {}
  try:
    for (path, m), inner in zip(layers, saved):
      m.dot_general = recorder(path, inner)
    for batch in batches:
      model(*(batch if isinstance(batch, tuple) else (batch,)))
      _accumulate(stats, captured)
      captured.clear()
  finally:
    for (_, m), inner in zip(layers, saved):
      m.dot_general = inner
  return stats


class LinenBlocks(blocks_lib.BlockModel):
  """The calibration engine's view of a Linen model built from repeated blocks.

  ``run_sequential(LinenBlocks(...), token_windows, recipe)`` compresses the blocks one after
  the other, each calibrated on the outputs of the compressed blocks before it, and returns the
  whole ``params`` tree with compressed leaves (run it with :func:`linen_apply`).

  Args:
    params: the model's ``params`` collection (a nested dict).
    block: an unbound Linen module equal to every block (same class and attributes), using
      ``nn.Dense`` layers with this module's hooks; the engine calls
      ``block.apply({"params": ...}, x)`` with ``x`` of shape ``(B, T, D)``.
    block_names: the top-level ``params`` keys of the blocks in order (``["block_0", ...]``).
    embed: ``embed(outside, tokens) -> x``: the first block's input from the parameters outside
      the blocks (a flat dict keyed by path, e.g. ``outside["embed/embedding"]``) and int tokens
      ``(B, T)``.

  Every ``nn.Dense`` kernel of a block is a linear layer of the engine (``linear_inputs`` maps
  each to its own input, captured by an ``nn.intercept_methods`` interceptor at trace time).
  """

  def __init__(self, params, block, block_names, embed):
    missing = [n for n in block_names if n not in params]
    if missing or not block_names:
      raise ValueError(f"LinenBlocks: block_names={list(block_names)!r} must be non-empty keys "
                       f"of params (missing {missing}; params has {sorted(params)})")
    self.params = params
    self.block = block
    self.block_names = list(block_names)
    self.num_blocks = len(self.block_names)
    self._embed = embed
    first = dict(leaves_with_paths(params[self.block_names[0]]))
    self.linear_inputs = {p: p for p, x in first.items()
                          if p.rsplit("/", 1)[-1] == "kernel" and len(x.shape) == 2}
    if not self.linear_inputs:
      raise ValueError(f"LinenBlocks: block {self.block_names[0]!r} has no 2-D kernel")

  def abstract_params(self):
    return blocks_lib.to_abstract_tree(self.params)

  def block_prefix(self, i):
    return f"{self.block_names[i]}/"

  def block_params(self, i):
    return dict(leaves_with_paths(self.params[self.block_names[i]]))

  def outside_params(self):
    return dict(leaves_with_paths({k: v for k, v in self.params.items()
                                   if k not in self.block_names}))

  def embed(self, outside, tokens):
    return self._embed(outside, tokens)

  def apply_block(self, block, x, capture=None):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top

    variables = {"params": for_linen(blocks_lib.unflatten(block))}
    if capture is None:
      return self.block.apply(variables, x)

    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
        capture["/".join(context.module.path) + "/kernel"] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      return self.block.apply(variables, x)
