"""PV-tuning: alternating updates of the continuous (P) and discrete (V) parameters.

Each optimizer step of :func:`compressjax.finetune.distill.finetune` computes one KD gradient
through a tree of :class:`~compressjax.finetune.ste.STEWeight` leaves whose forward pass uses
the **stored** codes (so the loss is the compressed model's). That single backward pass gives

* the P-gradient: scales/zeros (codes fixed) and any selected dense leaves, updated by the
  distillation optimizer (Adam, warm-up + cosine) -- the P-step;
* the V-gradient ``dL/dW_hat`` of every selected quantized weight, accumulated by a separate
  Adam into a straight-through buffer ``latent`` (initialised to the decoded weight).

Then the V-step (:func:`make_v_step`, jitted, run after each optimizer step) re-encodes codes
towards the buffer: candidate codes ``c' = encode(latent)`` (rounding to the grid of the updated
scales; nearest codeword for VQ), each code's priority ``||latent - W(c)||^2 -
||latent - W(c')||^2`` over its unit (:func:`codes_core.unit_priority`: how much the change
lowers the linearized objective, see there), and only the ``floor(tau * units)`` codes of
largest positive priority in each weight change (:func:`codes_core.select_top`). Afterwards the
buffer is pulled towards the new decoded weight by ``delta_decay`` (1: reset, the plain
linearized step; 0: keep accumulating).

The paper's choices and ours:

* Subspace (paper Sec. 3.3, "linearized V-step with subspace"): at each V-step only a subset
  ``S`` of the discrete variables may change, the ``tau`` fraction whose change most reduces
  the linearized objective (the paper's large-scale experiments use ``tau`` around 0.01 and
  find small fractions essential for stability). Same here, per weight matrix; the AQLM
  reference (``src/beam_search_l2.py``, ``max_update_fraction``) ranks groups by
  ``||buffer - W(c)||^2`` instead of by the gain of the change; we rank by the gain, so a code
  whose re-encoding leaves it unchanged is never counted.
* Step size: the paper steps in weight space with Adam's preconditioned update (the
  "StraightThroughAdam" of ``src/pv_optimizer.py``) and then projects (re-encodes) in plain
  L2; so do we, with the V learning rate ``lr_v`` (constant) and Adam moments kept across
  steps. The re-encoding is the L2-nearest code, not the ``P``-weighted one. ``lr_v`` is in
  weight units (``v_units="weight"``, the reference's) or, with ``v_units="grid"``, a fraction
  of each weight's grid step (:func:`grid_step`: the group's scale for scalar grids, the
  codebook's median nearest-neighbour distance per coordinate for VQ, taken at the start), so
  one setting moves every buffer the same fraction of the way to its next code whatever the
  bits or format (our addition; measured in the README, "Fine-tuning (issue 14)").
* Codebooks (AQLM, paper Sec. 4 / the reference's ``beam_search_l2.py``): the candidate codes
  of each group vector are the L2 beam search of
  :func:`codes_core.additive_encode` towards ``latent / s`` in the group's ``g``-dim space
  (beam ``beam_size``, given to :func:`to_pv`; 1 = coordinate descent over the ``M``
  codebooks), warm-started from the current codes; the unit is the group (its ``M`` codes),
  ranked by the gain of its new codes, and at most ``floor(tau * groups)`` groups change. The
  reference searches only the selected groups (those farthest from the buffer); we search all
  and select by gain (the search is the V-step's main cost: ``M * 2**B * g`` multiply-adds
  per group). E8P (and E8P inside an :class:`~compressjax.formats.Incoherent` leaf, in its
  rotated space): the candidate is the exact nearest lattice codeword of ``latent / scale``.
  VQ: the nearest codeword; scalar grids: rounding.

References:
  Malinovskii, Mazur, Ilin, Kuznedelev, Burlachenko, Yi, Alistarh, Richtárik, "PV-Tuning:
  Beyond Straight-Through Estimation for Extreme LLM Compression", arXiv:2405.14852;
  ``Vahe1994/AQLM`` ``src/pv_optimizer.py`` and ``src/beam_search_l2.py`` (reference code).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressjax.finetune import codes_core
from compressjax.finetune import ste
from compressjax.finetune.distill import DistillConfig, Partition

__all__ = ["PVConfig", "grid_step", "make_optimizer", "make_v_step", "to_pv", "v_budget"]


@dataclasses.dataclass(frozen=True)
class PVConfig:
  """V-step knobs.

  Attributes:
    tau: the largest fraction of each weight's codes a V-step may change (``0 < tau <= 1``).
    lr_v: Adam learning rate of the straight-through buffer, in the units of ``v_units``.
    delta_decay: after a V-step, ``latent += delta_decay * (W(c_new) - latent)``.
    v_units: ``"weight"`` (``lr_v`` in weight units) or ``"grid"`` (``lr_v`` a fraction of
      each weight's :func:`grid_step`; scalar and VQ leaves only).
  """

  tau: float = 0.01
  lr_v: float = 1e-3
  delta_decay: float = 0.0
  v_units: str = "weight"

  def __post_init__(self):
    if not (isinstance(self.tau, (int, float)) and 0 < self.tau <= 1):
      raise ValueError(f"PVConfig.tau must be in (0, 1], got {self.tau!r}")
    if not (isinstance(self.lr_v, (int, float)) and 0 < self.lr_v < float("inf")):
      raise ValueError(f"PVConfig.lr_v must be a finite float > 0, got {self.lr_v!r}")
    if not (isinstance(self.delta_decay, (int, float)) and 0 <= self.delta_decay <= 1):
      raise ValueError(f"PVConfig.delta_decay must be in [0, 1], got {self.delta_decay!r}")
    if self.v_units not in ("weight", "grid"):
      raise ValueError(f"PVConfig.v_units must be 'weight' or 'grid', got {self.v_units!r}")


def to_pv(params: Any, where=None, beam_size: int = 1) -> Any:
  """``params`` with the selected compressed leaves as PV leaves (stored-code forward);
  ``beam_size``: the beam of the AQLM V-step's re-encoding (1: coordinate descent)."""
  return ste.to_ste(params, where, forward_codes="stored", beam_size=beam_size)


def _latent_flags(params) -> list[bool]:
  """Per flattened leaf: whether it is the ``latent`` child of an STE/PV leaf."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [bool(kp) and isinstance(kp[-1], jax.tree_util.GetAttrKey) and kp[-1].name == "latent"
          for kp, _ in flat]


def grid_step(leaf: ste.STEWeight, path: str = "") -> tuple[jax.Array, tuple[int, int]]:
  """The per-coordinate spacing of ``leaf``'s codes, compactly: ``(step, (rows, cols))`` with
  ``jnp.repeat(jnp.repeat(step, rows, 0), cols, 1)`` of the leaf's ``(K, N)`` shape.

  Scalar grids: ``|scale|`` per group (the distance between adjacent levels). VQ: per codebook,
  ``|scale|`` times the median over its codewords of the distance to the nearest other codeword,
  divided by ``sqrt(dim)`` (a move of ``r`` of it on every coordinate covers ``r`` of that
  distance). Other formats raise a ``ValueError`` naming ``path``.
  """
  k, n = leaf.shape
  if leaf.kind == "scalar":
    step = jnp.abs(leaf.scale.astype(jnp.float32)).reshape(-1, n)
    return step, (k // step.shape[0], 1)
  if leaf.kind == "vq":
    cb = leaf.codebook.astype(jnp.float32)  # (Gk, Gn, E, d)
    d = cb.shape[-1]
    dist = jnp.sqrt(jnp.sum((cb[:, :, :, None] - cb[:, :, None]) ** 2, axis=-1))
    dist = jnp.where(jnp.eye(cb.shape[2], dtype=bool), jnp.inf, dist)
    nn = jnp.median(jnp.min(dist, axis=-1), axis=-1)  # (Gk, Gn)
    step = nn / np.sqrt(d) * jnp.abs(leaf.scale.astype(jnp.float32)).reshape(nn.shape)
    return step, (k // step.shape[0], n // step.shape[1])
  raise ValueError(f"PV v_units='grid' is defined for scalar and VQ leaves; {path or 'a leaf'} "
                   f"is {leaf.kind!r}: use v_units='weight' (lr_v in weight units)")


def _grid_scaler(steps: list, reps: list) -> optax.GradientTransformation:
  """Multiplies each V update by its weight's :func:`grid_step` (kept in the state, so it
  checkpoints and resumes with the optimizer); ``steps``/``reps`` in the V leaves' order."""

  def init(params):
    del params
    return {"grid_step": list(steps)}

  def update(updates, state, params=None):
    del params
    out, j = [], 0
    for u in updates:
      if isinstance(u, optax.MaskedNode):
        out.append(u)
        continue
      (r, c), s = reps[j], state["grid_step"][j]
      out.append(u * jnp.repeat(jnp.repeat(s, r, axis=0), c, axis=1))
      j += 1
    return out, state

  return optax.GradientTransformation(init, update)


def make_optimizer(params, part: Partition, dcfg: DistillConfig,
                   pcfg: PVConfig) -> optax.GradientTransformation:
  """The distillation optimizer on the continuous leaves (P) and Adam(``lr_v``) on the PV
  buffers (V), as one :func:`optax.multi_transform` over the trainable list; with
  ``v_units="grid"`` each V update is scaled by its weight's :func:`grid_step`."""
  flags = _latent_flags(params)
  labels = ["v" if flags[i] else "p" for i in part.train_idx]
  v = optax.adam(pcfg.lr_v, b1=dcfg.b1, b2=dcfg.b2)
  if pcfg.v_units == "grid":
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    owners = dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=ste.is_ste)[0])
    steps, reps = [], []
    for i in part.train_idx:
      if flags[i]:
        kp = flat[i][0][:-1]  # the STE leaf that owns this latent
        s, r = grid_step(owners[kp], jax.tree_util.keystr(kp))
        steps.append(s)
        reps.append(r)
    v = optax.chain(v, _grid_scaler(steps, reps))
  return optax.multi_transform({"p": dcfg.optimizer(), "v": v}, labels)


def v_budget(leaf: ste.STEWeight, tau: float) -> int:
  """Codes a V-step may change in ``leaf``: ``floor(tau * units)`` (at least 1)."""
  k, n = leaf.shape
  return max(1, int(tau * (k // leaf.unit_rows) * n))


def v_update(leaf: ste.STEWeight, tau: float, delta_decay: float):
  """One V-step on one PV leaf: ``(new_leaf, changed_units)``.

  A unit is one code (scalar grid, VQ vector, E8P 8-vector) or, for AQLM, the ``M`` codes of
  one group vector (the reference's "code group": changing any of them counts as changing
  the group); at most :func:`v_budget` units change.
  """
  old = leaf.prev_codes()
  cand = leaf.codes(latent=leaf.latent)  # re-encoding warm-started from ``old``
  w_old, w_new = leaf.decode(old), leaf.decode(cand)
  prio = codes_core.unit_priority(leaf.latent, w_old, w_new, leaf.unit_rows)
  differs = cand != old
  if differs.ndim == 3:  # AQLM (I, N, M): a unit is a group's M codes
    differs = jnp.any(differs, axis=-1)
  sel = codes_core.select_top(prio, v_budget(leaf, tau)) & differs
  new = jnp.where(sel[..., None] if old.ndim == 3 else sel, cand, old)
  stored = ste._wrap(leaf.kind, leaf.meta, None, leaf.scale, leaf.zero, leaf.codebook, new)  # pylint: disable=protected-access
  codes0 = ste._stored(stored)  # pylint: disable=protected-access
  latent = leaf.latent + delta_decay * (leaf.decode(new) - leaf.latent)
  return dataclasses.replace(leaf, latent=latent.astype(leaf.latent.dtype),
                             codes0=codes0.astype(leaf.codes0.dtype)), jnp.sum(sel)


def make_v_step(pcfg: PVConfig) -> Callable[[Partition], Callable]:
  """The ``post_step`` factory for :func:`~compressjax.finetune.distill.finetune`: given the
  partition, a jitted ``(train, frozen) -> (train, frozen, info)`` that re-encodes every PV
  leaf's codes (``info``: ``v_changed``, the codes changed, and ``v_frac_max``, the largest
  fraction changed in one weight)."""

  def factory(part: Partition):
    train_pos = {i: j for j, i in enumerate(part.train_idx)}

    @jax.jit
    def post(train, frozen):
      tree = part.combine(train, frozen)
      changed, fracs = [], []

      def one(x):
        if not (ste.is_ste(x) and x.forward_codes == "stored"):
          return x
        new, c = v_update(x, pcfg.tau, pcfg.delta_decay)
        k, n = x.shape
        changed.append(c)
        fracs.append(c / ((k // x.unit_rows) * n))
        return new

      new_tree = jax.tree.map(one, tree, is_leaf=ste.is_ste)
      leaves = jax.tree_util.tree_leaves(new_tree)
      flags = _latent_flags(new_tree)
      new_train = [leaves[i] if flags[i] else train[train_pos[i]] for i in part.train_idx]
      new_frozen = [leaves[i] for i in part.frozen_idx]
      zero = jnp.zeros((), jnp.float32)
      info = {"v_changed": sum(changed, zero),
              "v_frac_max": jnp.max(jnp.stack(fracs)) if fracs else zero}
      return new_train, new_frozen, info

    return post

  return factory
