"""AWQ scaling and clipping as a transform (tree wiring; the math is in ``quantize/awq_core``).

:func:`awq` rewrites the weights in full precision only: per-input-channel scales are folded
into the preceding operation (RMSNorm weight, or the previous linear's output columns) and the
weights are clipped. It is followed by a quantizer in a chain, e.g. ``chain(awq(4, 64),
rtn(4, 64))``; its :attr:`Transform.restat` tells later steps (GPTQ) how their input statistics
changed, so ``chain(awq(...), gptq(...))`` is calibrated on the rescaled inputs.
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from compressjax.formats import CompressedArray
from compressjax.quantize import awq_core, rtn_core
from compressjax.transforms.base import (DEFAULT_WHERE, PLANNING, Transform, UnmatchedRuleError,
                                         _UNDER_RULE, _map, _visible, leaves_with_paths_marked)
from compressjax.transforms.quantize import check_positive_int
from compressjax.transforms.selection import LINEAR_KERNELS, Selector, as_predicate

__all__ = ["AwqGroup", "AwqState", "awq", "llama_groups", "rescale_stats"]


class AwqGroup(NamedTuple):
  """Linears sharing one input, and the operation the input scale is folded into.

  ``prev`` is an RMSNorm weight path (``prev_kind="norm"``, ``w /= s``) or a linear kernel
  whose output columns feed the group (``prev_kind="linear"``, ``W[:, j] /= s_j``, bias too).
  A norm's bias beside its weight (``.../bias`` next to ``.../scale``, LayerNorm) is divided too.
  """

  name: str
  linears: tuple[str, ...]
  prev: str
  prev_kind: str


class AwqState(NamedTuple):
  groups: tuple[AwqGroup, ...]
  # kernel path -> the (K,) input scale applied so far (filled by update; used by restat).
  scales: dict[str, Any]
  # group name -> chosen alpha; kernel path -> mean clip ratio (reporting).
  report: dict[str, float]


def llama_groups(p: str, paths: set[str], shapes: dict[str, tuple[int, ...]]) -> list[AwqGroup]:
  """The scaling groups of the Llama block at prefix ``p`` (``"layers/3/"``).

  The default ``groups`` of :func:`awq`: q/k/v after ``attn_norm``, gate/up after ``mlp_norm``,
  down after up (the SwiGLU product is linear in up's outputs) and o after v when v's outputs are
  o's inputs one to one. ``paths`` are the selected kernels (a group is kept when all of its
  linears are selected), ``shapes`` every visible leaf's shape. Another model family passes its
  own function of the same signature.
  """
  out = [AwqGroup(p + "qkv", tuple(p + f"attn/{n}_proj/kernel" for n in "qkv"),
                  p + "attn_norm/scale", "norm"),
         AwqGroup(p + "gate_up", (p + "mlp/gate_proj/kernel", p + "mlp/up_proj/kernel"),
                  p + "mlp_norm/scale", "norm"),
         AwqGroup(p + "down", (p + "mlp/down_proj/kernel",), p + "mlp/up_proj/kernel", "linear")]
  v, o = p + "attn/v_proj/kernel", p + "attn/o_proj/kernel"
  # v -> o only when v's outputs are o's inputs one to one (no grouped-query sharing), as the
  # reference implementations do.
  if v in shapes and o in shapes and shapes[v][1] == shapes[o][0]:
    out.append(AwqGroup(p + "vo", (o,), v, "linear"))
  return [g for g in out if all(l in paths for l in g.linears)]


def rescale_stats(stats, s):
  """The :class:`~compressjax.calibration.LayerStats` of ``x / s`` from those of ``x``."""
  return type(stats)(stats.hessian / (s[:, None] * s[None, :]), stats.sq_sum / s**2,
                     stats.abs_sum / s, stats.n)


def awq(bits: int, group_size: int | None = None, *, symmetric: bool = True,
        scale_dtype=jnp.float16, n_grid: int = 20, clip: bool = True, max_shrink: float = 0.5,
        clip_skip: Selector = r".*attn/(q|k)_proj/kernel",
        where: Selector = DEFAULT_WHERE, groups=llama_groups,
        block_pattern: str = r"layers/\d+/") -> Transform:
  """Activation-aware scaling (and clipping) of the selected linears, in full precision.

  Args:
    bits, group_size, symmetric, scale_dtype: the grid of the quantizer that follows (the search
      measures errors on that grid).
    n_grid: grid points of the scale exponent and of the clipping search.
    clip: also search per-group clipping ranges.
    max_shrink: the largest clipping shrink searched (0.5: down to half the range).
    clip_skip: kernels never clipped (the reference skips q and k, whose errors pass through
      the attention softmax).
    where: which linear kernels are quantized afterwards (default: the decoder's linears). A
      group of linears sharing an input is scaled when all of them are selected.
    groups: ``(block prefix, selected kernel paths, shapes) -> [AwqGroup]``, the linears that
      share an input in one block and where their scale is folded (default
      :func:`llama_groups`; a GPT-2-style block folds into its LayerNorms, see
      ``tests/other_family.py``).
    block_pattern: regular expression matching a block's path prefix (``layers/<i>/``).

  Needs the full block (norms included) and calibration statistics: run it at the top level of
  the recipe (not inside a :func:`select` rule) through
  :func:`compressjax.calibration.run_sequential`.

  Examples:
    >>> from compressjax import transforms as T
    >>> recipe = T.chain(T.awq(4, 64), T.rtn(4, 64))

  References:
    Lin et al. 2023, AWQ (arXiv:2306.00978).
  """
  if bits not in rtn_core.RTN_BITS:
    raise ValueError(f"awq: bits must be one of {rtn_core.RTN_BITS}, got {bits!r}")
  check_positive_int("awq", "group_size", group_size, optional=True)
  check_positive_int("awq", "n_grid", n_grid)
  if not 0 < max_shrink < 1 or int(n_grid * max_shrink) < 1:
    raise ValueError(f"awq: max_shrink must be in (0, 1) with n_grid * max_shrink >= 1 (the "
                     f"clipping search needs a grid point), got max_shrink={max_shrink!r}, "
                     f"n_grid={n_grid!r}")
  search = jax.jit(functools.partial(awq_core.search_scale, bits=bits, group_size=group_size,
                                     symmetric=symmetric, scale_dtype=scale_dtype,
                                     n_grid=n_grid))
  clipper = jax.jit(functools.partial(awq_core.search_clip, bits=bits, group_size=group_size,
                                      symmetric=symmetric, scale_dtype=scale_dtype,
                                      n_grid=n_grid, max_shrink=max_shrink))
  skip = as_predicate(clip_skip)
  block_re = re.compile(block_pattern)

  def init(params):
    if _UNDER_RULE.get():
      raise ValueError("awq folds its scales into the norms and linears before each group, which "
                       "a select() rule hides; use awq at the top level of the recipe, e.g. "
                       "chain(awq(...), select((where, rtn(...))))")
    visible = {p: x for p, x in leaves_with_paths_marked(params) if _visible(x)}
    pred = as_predicate(LINEAR_KERNELS if where is DEFAULT_WHERE else where)
    selected = {p for p, x in visible.items() if pred(p, x)}
    shapes = {p: tuple(x.shape) for p, x in visible.items()}
    prefixes = sorted({m.group(0) for p in selected if (m := block_re.match(p))})
    found = [g for pre in prefixes for g in groups(pre, selected, shapes)]
    if visible and not found:
      raise UnmatchedRuleError(f"awq: where={where!r} selects no complete group of linears that "
                               f"share an input (e.g. q/k/v) among {list(visible)[:4]}...")
    return AwqState(tuple(found), {}, {})

  def update(params, state, stats=None):
    visible = {p: x for p, x in leaves_with_paths_marked(params) if _visible(x)}
    todo = [g for g in state.groups if all(l in visible for l in g.linears)]
    if not todo or stats is PLANNING:  # scaling and clipping never change shapes
      return params, state
    new = {}
    scales, report = dict(state.scales), dict(state.report)
    for g in todo:
      for p in g.linears + (g.prev,):
        if p not in visible:
          raise ValueError(f"awq: group {g.name} needs parameter {p!r}, which is not visible")
        if isinstance(visible[p], CompressedArray):
          raise ValueError(f"awq at parameter {p!r}: expects dense weights (run awq before any "
                           "quantizer in the chain)")
      st = (stats or {}).get(g.linears[0])
      if st is None:
        raise ValueError(f"awq at parameter {g.linears[0]!r} needs calibration statistics; run it "
                         "through compressjax.calibration.run_sequential")
      n = jnp.maximum(st.n, 1.0)
      H = st.hessian / n
      # All scales are searched on the original weights, then applied (as the reference).
      s, alpha, _ = search(tuple(visible[l] for l in g.linears), H, st.abs_sum / n)
      report[g.name] = float(alpha)
      for l in g.linears:
        scales[l] = s
      new[g] = s
    out = dict(visible)
    for g, s in new.items():
      for l in g.linears:
        out[l] = (out[l] * s[:, None].astype(out[l].dtype))
      prev = out[g.prev]
      if g.prev_kind == "norm":
        out[g.prev] = prev / s.astype(prev.dtype)
      else:
        out[g.prev] = prev / s[None, :].astype(prev.dtype)
      bias = g.prev.rsplit("/", 1)[0] + "/bias"
      if bias in out:
        out[bias] = out[bias] / s.astype(out[bias].dtype)
    if clip:
      for g, s in new.items():
        st = stats[g.linears[0]]
        Hs = rescale_stats(st, s).hessian / jnp.maximum(st.n, 1.0)
        for l in g.linears:
          if skip(l, out[l]):
            continue
          w, ratio = clipper(out[l], Hs)
          out[l] = w.astype(out[l].dtype)
          report[l] = float(jnp.mean(ratio))
    params = _map(lambda p, x: out.get(p, x) if _visible(x) else x, params)
    return params, AwqState(state.groups, scales, report)

  def restat(state, stats):
    if stats is None or stats is PLANNING:
      return stats
    return {p: (rescale_stats(st, state.scales[p]) if p in state.scales else st)
            for p, st in stats.items()}

  return Transform(init, update, restat)
