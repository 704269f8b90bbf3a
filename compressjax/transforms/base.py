"""Compression transforms: pairs of pure functions, composed by chaining (optax style).

A :class:`Transform` is ``(init, update)``:

* ``init(params) -> state`` plans the rewrite from paths and shapes alone (it also works on trees
  of ``jax.ShapeDtypeStruct``) and records which parameters it will touch;
* ``update(params, state, stats=None) -> (params, state)`` performs it. ``stats`` carries
  calibration statistics keyed by parameter path for data-aware methods; data-free methods such as
  RTN ignore it.

Recipes are chains (``chain(prune, quantize, compensate)``) and per-parameter settings are
:func:`select` rules (first match wins; a rule that matches nothing is an error, so a typo in a
config can never silently do nothing).
"""

from __future__ import annotations

import contextvars
import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import Incoherent
from compressjax.transforms.selection import (LINEAR_KERNELS, Selector, as_predicate, is_leaf,
                                              leaves_with_paths, path_str)

__all__ = [
    "Transform",
    "Rule",
    "UnmatchedRuleError",
    "ChainState",
    "DEFAULT_WHERE",
    "PLANNING",
    "LeafwiseState",
    "SelectState",
    "chain",
    "identity",
    "leafwise",
    "nonfinite_count",
    "select",
    "apply",
    "plan",
    "to_abstract",
]

Params = Any
# True while a select() rule plans its transform: the transform's default selection is then the
# rule's selection (scoped to that init call; never read elsewhere).
_UNDER_RULE = contextvars.ContextVar("compressjax_under_rule", default=False)


class Transform(NamedTuple):
  """A compression step: ``init(params) -> state``; ``update(params, state, stats) -> (params, state)``.

  ``restat(state, stats) -> stats`` (optional) is for steps that change the *inputs* of layers
  (AWQ's scaling folds ``1/s`` into the previous operation): given the state after ``update``, it
  maps the calibration statistics of the original inputs to those of the new inputs, which
  :func:`chain` hands to the steps that follow.

  ``scope`` is ``"block"`` when ``update`` may see the parameters a block at a time (what the
  calibration engine does) and ``"global"`` when its result depends on all selected parameters
  at once (one threshold or budget across layers); the engine refuses a global step rather than
  let it silently become per-block.
  """

  init: Callable[[Params], Any]
  update: Callable[..., tuple[Params, Any]]
  restat: Callable[[Any, Any], Any] | None = None
  scope: str = "block"


def scope_of(*transforms: "Transform | None") -> str:
  """``"global"`` if any of ``transforms`` has a global scope, else ``"block"``."""
  return "global" if any(t is not None and t.scope == "global" for t in transforms) else "block"


class UnmatchedRuleError(ValueError):
  """A selection rule matched no parameter."""


class _Unselected:
  """Stands in for a leaf a transform must not see (like optax's ``MaskedNode``)."""

  __slots__ = ()

  def __repr__(self):
    return "Unselected"


jax.tree_util.register_pytree_node(_Unselected, lambda x: ((), None), lambda aux, ch: _UNSELECTED)
_UNSELECTED = _Unselected()


def _visible(leaf: Any) -> bool:
  return leaf is not None and not isinstance(leaf, _Unselected)


def _leaf_or_marker(x):
  return is_leaf(x) or isinstance(x, _Unselected)


def _map(fn, params):
  return jax.tree_util.tree_map_with_path(lambda kp, x: fn(path_str(kp), x), params,
                                          is_leaf=_leaf_or_marker)


class _Planning:
  """The ``stats`` that :func:`plan` passes: shapes only, no calibration data."""

  __slots__ = ()

  def __repr__(self):
    return "PLANNING"


#: ``stats`` value during :func:`plan` (shape planning). Data-aware transforms then compute with
#: placeholder statistics (output shapes do not depend on them) or return their input unchanged
#: when they preserve shapes.
PLANNING = _Planning()


def _real_stats(stats) -> bool:
  return stats is not None and stats is not PLANNING


class ChainState(NamedTuple):
  inner: tuple[Any, ...]


def chain(*transforms: Transform) -> Transform:
  """Applies ``transforms`` one after the other (``chain(prune, quantize, compensate)``).

  Each step is planned on the abstract output of the steps before it, so a quantizer chained
  after a pruner selects the pruner's outputs.
  """

  def init(params):
    abstract = to_abstract(params)
    states = []
    for t in transforms:
      states.append(t.init(abstract))
      abstract = plan(t, abstract, state=states[-1])
    return ChainState(tuple(states))

  def update(params, state, stats=None):
    new_states = []
    for t, s in zip(transforms, state.inner):
      params, s = t.update(params, s, stats)
      if _real_stats(stats) and t.restat is not None:
        stats = t.restat(s, stats)
      new_states.append(s)
    return params, ChainState(tuple(new_states))

  def restat(state, stats):
    for t, s in zip(transforms, state.inner):
      if _real_stats(stats) and t.restat is not None:
        stats = t.restat(s, stats)
    return stats

  return Transform(init, update, restat, scope_of(*transforms))


def identity() -> Transform:
  return Transform(lambda params: None, lambda params, state, stats=None: (params, state))


class LeafwiseState(NamedTuple):
  """Which parameters a leaf-wise transform rewrites (paths in tree order)."""

  paths: tuple[str, ...]


class _DefaultWhere:
  """The default selection: the decoder's linear kernels, or, under a :func:`select` rule, exactly
  the parameters the rule selected."""

  def __repr__(self):
    return "DEFAULT_WHERE"


DEFAULT_WHERE = _DefaultWhere()


def leafwise(fn: Callable[..., Any], where: Selector | _DefaultWhere = DEFAULT_WHERE, *,
             name: str = "leafwise", with_stats: bool = False,
             see_through: bool = True) -> Transform:
  """A transform that rewrites each selected leaf independently: ``leaf -> fn(path, leaf)``.

  Args:
    fn: ``(path, leaf) -> new_leaf``, or ``(path, leaf, stats) -> new_leaf`` with ``with_stats``.
    where: which parameters. The default is :data:`LINEAR_KERNELS` when the transform is used on
      its own and "everything the rule selected" when it is the transform of a :func:`select`
      rule; an explicit selector always applies (inside a rule, on top of the rule's).
    name: used in error messages.
    with_stats: ``fn`` needs the calibration statistics of the parameter (``stats[path]``, as
      :func:`compressjax.calibration.run_sequential` provides them); missing ones are an error.
    see_through: an :class:`~compressjax.formats.Incoherent` leaf is rewritten inside: ``fn``
      gets its inner (rotated) weight and the rotated statistics
      (:meth:`~compressjax.formats.Incoherent.rotate_stats`), and its result is re-wrapped with
      the same signs. ``False`` hands ``fn`` the leaf itself.

  Selecting nothing among the parameters it is given raises :class:`UnmatchedRuleError`, and
  errors raised by ``fn`` are re-raised naming the transform and the parameter path.
  """

  def init(params):
    visible = [(p, leaf) for p, leaf in leaves_with_paths_marked(params) if _visible(leaf)]
    if isinstance(where, _DefaultWhere):
      pred = (lambda p, x: True) if _UNDER_RULE.get() else as_predicate(LINEAR_KERNELS)
    else:
      pred = as_predicate(where)
    paths = tuple(p for p, leaf in visible if pred(p, leaf))
    if visible and not paths:
      raise UnmatchedRuleError(
          f"{name}: where={where!r} selects none of the {len(visible)} parameters it was given "
          f"(e.g. {[p for p, _ in visible[:3]]})")
    return LeafwiseState(paths)

  def update(params, state, stats=None):
    selected = set(state.paths)

    def rewrite(path, leaf):
      if path not in selected or not _visible(leaf):
        return leaf
      if with_stats and stats is PLANNING:
        from compressjax.calibration import LayerStats  # pylint: disable=g-import-not-at-top
        st = LayerStats.zeros(leaf.shape[0])  # placeholder: only output shapes are planned
      elif with_stats:
        st = (stats or {}).get(path)
        if st is None:
          raise ValueError(f"{name} at parameter {path!r} needs calibration statistics; run it "
                           "through compressjax.calibration.run_sequential (or pass stats)")
      wrapper = None
      if see_through and isinstance(leaf, Incoherent):
        wrapper, leaf = leaf, leaf.inner
        if with_stats and stats is not PLANNING:
          st = wrapper.rotate_stats(st)
      try:
        _check_finite(leaf, "weight")
        if with_stats and stats is not PLANNING:
          _check_finite(st.hessian, "calibration statistics (X^T X)")
        out = fn(path, leaf, st) if with_stats else fn(path, leaf)
        _check_finite(out, "result")  # e.g. a degenerate Hessian: never a silent NaN model
        return out if wrapper is None else dataclasses.replace(wrapper, inner=out)
      except (ValueError, TypeError, NotImplementedError) as e:
        raise _with_context(e, f"{name} at parameter {path!r}: {e}") from e
      except Exception as e:  # pylint: disable=broad-except  # other types: keep them, add where
        e.add_note(f"(in {name} at parameter {path!r})")
        raise

    return _map(rewrite, params), state

  return Transform(init, update)


def nonfinite_count(tree) -> int:
  """How many NaN/Inf values the concrete floating arrays of ``tree`` hold (tracers and
  abstract arrays, seen while planning, are skipped)."""
  bad = 0
  for x in jax.tree.leaves(tree):
    if (isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)
        and jnp.issubdtype(x.dtype, jnp.inexact)):
      bad += int(x.size - jnp.count_nonzero(jnp.isfinite(x)))
  return bad


def _check_finite(tree, what: str) -> None:
  """Raises ``ValueError`` if ``tree`` holds NaN or Inf (see :func:`nonfinite_count`)."""
  bad = nonfinite_count(tree)
  if bad:
    raise ValueError(f"{what} has {bad} non-finite values (NaN/Inf)")


def _with_context(e: Exception, msg: str) -> Exception:
  """``e``'s type with message ``msg`` when that type is built from a message (as builtin errors
  are), else the nearest builtin base of ``e`` (a JAX tracer error, say, takes a tracer)."""
  try:
    new = type(e)(msg)
    if str(new) == msg:
      return new
  except Exception:  # pylint: disable=broad-except
    pass
  base = next(b for b in (NotImplementedError, ValueError, TypeError) if isinstance(e, b))
  return base(msg)


@dataclasses.dataclass(frozen=True)
class Rule:
  """``where`` selects parameters; ``transform`` (``None`` = keep unchanged) is applied to them."""

  where: Selector
  transform: Transform | None
  name: str = ""

  def label(self, i: int) -> str:
    return self.name or (self.where if isinstance(self.where, str) else f"rule {i}")


class SelectState(NamedTuple):
  """``assignment[path]`` is the index of the rule that claimed the parameter (first match)."""

  assignment: dict[str, int]
  inner: tuple[Any, ...]


def select(*rules: Rule | tuple[Selector, Transform | None], on_unmatched: str = "error") -> Transform:
  """Routes parameters to transforms by rules; the first rule that matches a parameter wins.

  Args:
    *rules: :class:`Rule` objects or ``(where, transform)`` pairs. Parameters that no rule
      matches are left unchanged.
    on_unmatched: ``"error"`` (default) raises :class:`UnmatchedRuleError` when a rule matches no
      parameter (or only parameters an earlier rule already claimed); ``"warn"`` warns instead.

  Examples:
    >>> import jax.numpy as jnp
    >>> from compressjax import transforms as T
    >>> params = {"a": {"kernel": jnp.ones((64, 8))}, "b": {"kernel": jnp.ones((64, 8))}}
    >>> t = T.select((r"a/kernel", T.rtn(bits=8)), (r".*", None))
    >>> out, state = T.apply(t, params)
    >>> type(out["a"]["kernel"]).__name__, type(out["b"]["kernel"]).__name__
    ('QuantizedArray', 'ArrayImpl')
  """
  if on_unmatched not in ("error", "warn"):
    raise ValueError(f"on_unmatched must be 'error' or 'warn', got {on_unmatched!r}")
  rules = tuple(r if isinstance(r, Rule) else Rule(*r) for r in rules)
  preds = [as_predicate(r.where) for r in rules]

  def init(params):
    assignment: dict[str, int] = {}
    hits = [0] * len(rules)
    for path, leaf in leaves_with_paths(params):
      if not _visible(leaf):
        continue
      for i, pred in enumerate(preds):
        if pred(path, leaf):
          assignment[path] = i
          hits[i] += 1
          break
    unmatched = [rules[i].label(i) for i, h in enumerate(hits) if h == 0]
    if unmatched:
      msg = (f"selection rules matched no parameter: {unmatched}. Parameter paths look like "
             f"{[p for p, _ in leaves_with_paths(params)][:4]}...")
      if on_unmatched == "error":
        raise UnmatchedRuleError(msg)
      warnings.warn(msg, stacklevel=2)
    inner = tuple(None if r.transform is None else _init_under_rule(r.transform, params, assignment, i)
                  for i, r in enumerate(rules))
    return SelectState(assignment, inner)

  def update(params, state, stats=None):
    new_inner = []
    for i, (r, s) in enumerate(zip(rules, state.inner)):
      if r.transform is None:
        new_inner.append(s)
        continue
      sub, s = r.transform.update(_masked(params, state.assignment, i), s, stats)
      params = _merge(params, sub, state.assignment, i)
      new_inner.append(s)
    return params, SelectState(state.assignment, tuple(new_inner))

  def restat(state, stats):
    for r, s in zip(rules, state.inner):
      if _real_stats(stats) and r.transform is not None and r.transform.restat is not None:
        stats = r.transform.restat(s, stats)
    return stats

  return Transform(init, update, restat, scope_of(*(r.transform for r in rules)))


def _init_under_rule(transform, params, assignment, i):
  token = _UNDER_RULE.set(True)
  try:
    return transform.init(_masked(params, assignment, i))
  finally:
    _UNDER_RULE.reset(token)


def _masked(params, assignment, i):
  return _map(lambda p, x: x if assignment.get(p) == i else _UNSELECTED, params)


def _merge(params, sub, assignment, i):
  flat_sub = dict(leaves_with_paths_marked(sub))
  return _map(lambda p, x: flat_sub[p] if assignment.get(p) == i else x, params)


def leaves_with_paths_marked(params):
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_leaf_or_marker)
  return [(path_str(kp), leaf) for kp, leaf in flat]


def to_abstract(params: Params) -> Params:
  """The same tree with every array replaced by a ``jax.ShapeDtypeStruct``."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


def apply(transform: Transform, params: Params, stats: Any = None) -> tuple[Params, Any]:
  """``init`` then ``update``: returns ``(new_params, state)``.

  ``params`` may be a nested dict of arrays or an ``nnx.State``; an ``nnx.State`` comes back as
  an ``nnx.State`` of the same structure with rewritten values.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  if isinstance(params, nnx.State):
    pure = nnx.to_pure_dict(params)
    new, state = apply(transform, pure, stats)
    out = jax.tree.map(lambda x: x, params)  # a copy: never mutate the caller's state
    nnx.replace_by_pure_dict(out, new)
    return out, state
  state = transform.init(params)
  return transform.update(params, state, stats)


def plan(transform: Transform, abstract_params: Params, state: Any = None) -> Params:
  """Shapes and dtypes of the compressed tree, from a tree of ``jax.ShapeDtypeStruct``.

  Nothing is computed: the rewrite is traced with ``jax.eval_shape``.
  """
  state = transform.init(abstract_params) if state is None else state
  return jax.eval_shape(lambda p: transform.update(p, state, PLANNING)[0], abstract_params)
