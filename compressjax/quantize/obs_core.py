"""One Optimal-Brain-Surgeon solver for every Hessian-aware rounding rule. Pure math on arrays.

GPTQ, SparseGPT, SpQR, OWQ, GPTVQ and QuIP#'s BlockLDLQ all solve the same problem for one
linear layer with calibration inputs ``X``: replace ``W`` ``(K, N)`` (``(in, out)``, ``y = x @ W``)
by a constrained ``Q`` minimising ``||X W - X Q||_F^2``, one input feature (a *row* here; a column
of the papers' ``(out, in)`` weight) or a few at a time, feeding each step's error into the rows
not yet processed. They differ only in the **rule** that turns the current rows into their
constrained value: round to a grid (GPTQ, SpQR, OWQ), zero the least salient entries (SparseGPT),
round ``d`` rows jointly to a codebook (GPTVQ) or to a lattice (BlockLDLQ). This module is that
common recursion; each method supplies its rule (see :func:`sweep`).

Preparation (IST-DASLab ``gptq.py`` / ``sparsegpt.py``; :func:`drop_dead`, :func:`hinv_cholesky`):
dead inputs (``H[i, i] == 0``) get ``H[i, i] = 1`` and ``W[i] = 0``; damping
``H += percdamp * mean(diag(H)) * I``, raised tenfold while the Cholesky factorisation fails;
``Hinv`` is the upper Cholesky factor ``U`` of ``H^{-1} = U^T U``.

**Split over a mesh** (:func:`split_columns`): every step of the recursion acts on all output
columns ``N`` alike and couples them only through ``H`` (shared), so a solver can run with ``W``'s
columns split over mesh axes (``jax.shard_map``), each device solving its own columns with the
replicated ``H``/``Hinv``. The per-column arithmetic is the same as on one device; what a rule
computes *across* columns (SparseGPT's block mask, SpQR's outlier threshold, the loss) it does
with a collective over ``axis_name`` (:func:`gather_columns`, ``jax.lax.psum``); what it needs
from the whole layer before the recursion (OWQ's kept rows, E8P's layer scale) it computes from
the whole ``W`` first (:func:`whole`), by the one-device program. GPTVQ and AQLM fit codebooks
shared by many output columns: their k-means sums, GPTVQ's M-step gradient and AQLM's codebook
normal equations are summed over ``axis_name`` (``psum``) so every device holds the same
codebooks, and GPTVQ's Mahalanobis initialisation (a sort over all of a codebook's vectors) runs
on the gathered rows (see :mod:`~compressjax.quantize.gptvq_core`,
:mod:`~compressjax.quantize.aqlm_core`).

The recursion (:func:`sweep`), with lazy batch updates over blocks of ``blocksize`` rows
``[i1, i2)`` and steps of ``step`` rows ``S = [i, i + step)`` inside a block:

* the rule maps the current rows ``w = W[S]`` to ``q`` (same shape);
* ``Err[S] = U[S, S]^{-T} (w - q)`` (for ``step = 1``: ``(w - q) / U[i, i]``);
* ``W[i:i2] -= U[S, i:i2]^T Err[S]`` inside the block, and after the block
  ``W[i2:] -= U[i1:i2, i2:]^T Err[i1:i2]`` in one matmul.

For ``step = 1`` this is GPTQ's Algorithm 1 exactly. For ``step > 1`` it is the block OBS update
of GPTVQ (van Baalen et al. 2024, eq. 4) and QuIP#'s BlockLDLQ (Tseng et al. 2024, Alg. 3): the
remaining rows absorb the optimal compensation for the whole step's error given that the step's
rows are fixed together. The objective reported, ``loss = sum ||Err[S]||^2 / 2``, is GPTQ's
``sum((w - q)^2 / d^2) / 2`` for ``step = 1`` and in general the increase of ``||X W - X Q||^2``
(divided by ``2n``) that each step causes given the rows before it.

References:
  Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ", arXiv:2210.17323 (Algorithm 1).
  Frantar & Alistarh, "SparseGPT", arXiv:2301.00774 (Algorithm 1).
  van Baalen et al., "GPTVQ: The Blessing of Dimensionality for LLM Quantization",
  arXiv:2402.15319 (Algorithm 1, the block update).
  Tseng, Chee, Sun, Kuleshov, De Sa, "QuIP#", arXiv:2402.04396 (Algorithm 3, BlockLDLQ).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

# The papers' variable names (H, Hinv, W, Err1, ...) are kept on purpose.
# pylint: disable=invalid-name

__all__ = ["DAMP_RETRIES", "ColumnSplit", "Step", "cholesky_inverse", "column_split", "drop_dead",
           "gather_columns", "hinv_cholesky", "hinv_factor", "padded_length", "percdamp_schedule",
           "place", "place_leaf", "split_columns", "sweep", "whole"]

#: How many dampings are tried: ``percdamp * 10**t`` for ``t = 0 .. DAMP_RETRIES - 1``
#: (``percdamp = 0`` retries from ``1e-4 * 10**(t-1)``).
DAMP_RETRIES = 6


def percdamp_schedule(percdamp: float, t: int) -> float:
  """Relative damping of attempt ``t`` (``0 <= t < DAMP_RETRIES``)."""
  if t == 0:
    return percdamp
  return (percdamp if percdamp > 0 else 1e-5) * 10.0**t


def drop_dead(W: jax.Array, H: jax.Array):
  """Dead inputs (``H[i, i] == 0``: the feature is always zero): ``H[i, i] = 1``, ``W[i] = 0``.

  Returns ``(W, H, dead)`` with ``dead`` the ``(K,)`` boolean mask.
  """
  dead = jnp.diag(H) == 0
  H = H + jnp.diag(dead.astype(H.dtype))
  W = jnp.where(dead[:, None], jnp.zeros((), W.dtype), W)
  return W, H, dead


#: Diagonal block size of :func:`cholesky_inverse`'s recursion (below it: LAPACK-style kernels).
_CHOL_BASE = 128


def _mm(a, b):
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def cholesky_inverse(A: jax.Array, base: int = _CHOL_BASE) -> tuple[jax.Array, jax.Array]:
  """``(L, L^{-1})`` with ``A = L L^T`` (``L`` lower triangular), by recursive blocking.

  ``A = [[A11, .], [A21, A22]]`` splits at a multiple of ``base``: ``L11`` and ``L11^{-1}`` of
  ``A11`` (recursively), ``L21 = A21 L11^{-T}``, ``L22`` and ``L22^{-1}`` of the Schur
  complement ``A22 - L21 L21^T`` (recursively) and ``(L^{-1})21 = -L22^{-1} L21 L11^{-1}``. All
  but ``base``-sized diagonal blocks is matrix multiplication (float32 at ``HIGHEST``
  precision), about ``2 K^3 / 3`` flops in all, where XLA's unblocked Cholesky and triangular
  solves on CPU run far below the matmul rate. A non-positive-definite ``A`` gives NaNs.

  References:
    Gustavson, "Recursion leads to automatic variable blocking for dense linear-algebra
    algorithms", IBM J. Res. Dev. 41(6), 1997 (recursive Cholesky and triangular inverse).
  """
  n = A.shape[0]
  if n <= base:
    L = jnp.linalg.cholesky(A)
    return L, jax.scipy.linalg.solve_triangular(L, jnp.eye(n, dtype=A.dtype), lower=True)
  h = max(base, (n // 2) // base * base)
  L11, L11i = cholesky_inverse(A[:h, :h], base)
  L21 = _mm(A[h:, :h], L11i.T)
  L22, L22i = cholesky_inverse(A[h:, h:] - _mm(L21, L21.T), base)
  X = -_mm(L22i, _mm(L21, L11i))
  z = jnp.zeros((h, n - h), A.dtype)
  return jnp.block([[L11, z], [L21, L22]]), jnp.block([[L11i, z], [X, L22i]])


def hinv_factor(H: jax.Array) -> jax.Array:
  """Upper triangular ``U`` with ``H^{-1} = U^T U`` (``torch.linalg.cholesky(cholesky_inverse(
  cholesky(H)), upper=True)`` of the references), from one Cholesky factorisation.

  With ``J`` the row-reversal, ``J H J = L L^T`` gives ``H = R R^T`` for the upper triangular
  ``R = J L J``, so ``H^{-1} = R^{-T} R^{-1}`` and ``U = R^{-1} = J L^{-1} J`` (the factor is
  unique given a positive diagonal). One recursive Cholesky with its triangular inverse
  (:func:`cholesky_inverse`) replaces the references' Cholesky, full inverse and second Cholesky
  (about 4x fewer flops, all in matmuls); equal up to float32 rounding (and closer to a float64
  computation on the reference model's shapes, ``tests/test_obs_core.py``).
  """
  return cholesky_inverse(H[::-1, ::-1])[1][::-1, ::-1]


def hinv_cholesky(H: jax.Array, percdamp: float):
  """Upper Cholesky factor of ``(H + damp I)^{-1}``, raising ``damp`` until it succeeds.

  Returns ``(Hinv, percdamp_used, damp, ok)``; ``Hinv`` is upper triangular with
  ``(H + damp I)^{-1} = Hinv^T Hinv`` (:func:`hinv_factor`). If every damping of the schedule
  fails (e.g. ``H`` holds NaNs), ``Hinv = I`` (no error feedback: plain rounding) and ``ok`` is
  ``False``.
  """
  K = H.shape[0]
  eye = jnp.eye(K, dtype=H.dtype)
  mean_diag = jnp.mean(jnp.diag(H))
  rels = jnp.asarray([percdamp_schedule(percdamp, t) for t in range(DAMP_RETRIES)], H.dtype)

  def attempt(t):
    rel = rels[t]
    damp = rel * mean_diag
    Hinv = jnp.triu(hinv_factor(H + damp * eye))
    return rel, damp, Hinv

  def cond(state):
    t, _, _, _, ok = state
    return jnp.logical_and(jnp.logical_not(ok), t < DAMP_RETRIES)

  def body(state):
    t = state[0]
    rel, damp, Hinv = attempt(t)
    return t + 1, rel, damp, Hinv, jnp.all(jnp.isfinite(Hinv))

  zero = jnp.zeros((), H.dtype)
  _, rel, damp, Hinv, ok = jax.lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), zero, zero, eye, jnp.zeros((), bool)))
  Hinv = jnp.where(ok, Hinv, eye)
  return Hinv, rel, damp, ok


def padded_length(K: int, blocksize: int) -> int:
  """Rows :func:`sweep` runs over: ``K`` rounded up to a multiple of ``min(blocksize, K)``.

  Rules whose state is indexed by the step's row ``j`` size it with this.
  """
  B = min(blocksize, K)
  return -(-K // B) * B


class Step(NamedTuple):
  """What a rounding rule sees at one step of :func:`sweep`.

  Attributes:
    j: index (in processing order, padded) of the step's first row; a traced int32.
    i: index of that row inside the current block.
    w: ``(step, N)`` the step's current rows (every earlier step's error fed in).
    U: ``(step, step)`` the step's diagonal block of ``Hinv`` (upper triangular); ``U[r, r]``
      is GPTQ's ``d`` of row ``j + r``.
    block: ``(blocksize, N)`` the current block's rows, up to date for rows ``>= i``.
    rows: ``rows(start, size)`` returns rows ``[start, start + size)`` (any rows, also past the
      block) with every error so far fed in: what GPTQ fits a group's grid to.
  """

  j: jax.Array
  i: jax.Array
  w: jax.Array
  U: jax.Array
  block: jax.Array
  rows: Callable[[Any, int], jax.Array]


Rule = Callable[[Step, Any], tuple[jax.Array, Any]]
BlockStart = Callable[[jax.Array, jax.Array, jax.Array, Any], Any]


def sweep(W: jax.Array, Hinv: jax.Array, rule: Rule, state: Any, *, blocksize: int,
          step: int = 1, block_start: BlockStart | None = None, keep_values: bool = True):
  """Runs the OBS recursion (module docstring) with ``rule`` choosing each step's values.

  Args:
    W: ``(K, N)`` weight, rows in processing order, dead rows zeroed (:func:`drop_dead`).
    Hinv: ``(K, K)`` upper Cholesky factor of the damped ``H^{-1}`` in the same order.
    rule: ``rule(step: Step, state) -> (q, state)`` with ``q`` of shape ``(step, N)``. It is
      also called on padding rows (``j >= K``, ``w = 0``); their values are dropped and their
      error reaches no real row.
    state: the rule's carried state (any pytree; codes, grids, masks, ...).
    blocksize: rows per lazy batch update (a performance knob: results do not depend on it
      beyond float rounding, unless the rule itself looks at blocks).
    step: rows rounded jointly (1 for scalar rules; the vector dimension for codebooks and
      lattices). ``min(blocksize, K)`` must be a multiple of it.
    block_start: optional ``block_start(i1, W1, Hinv11, state) -> state`` called when a block
      ``[i1, i1 + B)`` starts, with its current rows ``W1`` and ``Hinv`` block (SparseGPT
      chooses the block's mask there).
    keep_values: collect the chosen values into ``Q``; ``False`` when the rule keeps what it
    needs in its own state (GPTQ's codes), saving a ``(K, N)`` buffer written every step.

  Returns:
    ``(Q, state, loss)``: the ``(K, N)`` values the rule chose (processing order; ``None``
    without ``keep_values``), its final state, and ``sum ||Err||^2 / 2`` over real rows (module
    docstring).
  """
  K, N = W.shape
  ctype = W.dtype
  B = min(blocksize, K)
  if B % step:
    raise ValueError(f"blocksize={blocksize} (or K={K} if smaller) must be a multiple of "
                     f"step={step}")
  Kp = padded_length(K, blocksize)
  if Kp != K:
    # Padding rows: W = 0 and an identity block of Hinv, so they never feed errors into real rows.
    W = jnp.pad(W, ((0, Kp - K), (0, 0)))
    Hinv = jnp.pad(Hinv, ((0, Kp - K), (0, Kp - K)))
    Hinv = Hinv.at[K:, K:].set(jnp.eye(Kp - K, dtype=ctype))

  def block_step(b, carry):
    W, Q, loss, state = carry
    i1 = b * B
    Hinv1 = jax.lax.dynamic_slice_in_dim(Hinv, i1, B, axis=0)  # (B, Kp): rows of the block
    Hinv11 = jax.lax.dynamic_slice_in_dim(Hinv1, i1, B, axis=1)  # (B, B)
    W1 = jax.lax.dynamic_slice_in_dim(W, i1, B, axis=0)
    if block_start is not None:
      state = block_start(i1, W1, Hinv11, state)
    Err1 = jnp.zeros_like(W1)

    def step_fn(t, carry):
      W1, Err1, Q, loss, state = carry
      i = t * step
      j = i1 + i

      def rows(start, size):
        return (jax.lax.dynamic_slice_in_dim(W, start, size, axis=0)
                - jax.lax.dynamic_slice_in_dim(Hinv1, start, size, axis=1).T @ Err1)

      if step == 1:
        w = W1[i][None]
        U = Hinv11[i, i][None, None]
      else:
        w = jax.lax.dynamic_slice_in_dim(W1, i, step, axis=0)
        U = jax.lax.dynamic_slice(Hinv11, (i, i), (step, step))
      q, state = rule(Step(j=j, i=i, w=w, U=U, block=W1, rows=rows), state)
      q = q.astype(ctype)
      real = (j + jnp.arange(step)) < K
      if step == 1:
        # Hinv11[i, :i] == 0 (upper triangular): W1[i:] -= outer(Hinv11[i, i:], err1).
        err1 = (w[0] - q[0]) / U[0, 0]
        W1 = W1 - Hinv11[i][:, None] * err1[None, :]
        Err1 = jax.lax.dynamic_update_index_in_dim(Err1, err1, i, axis=0)
        loss = loss + jnp.where(real[0], jnp.sum((w[0] - q[0])**2) / U[0, 0]**2 / 2,
                                jnp.zeros((), ctype))
      else:
        err = jax.scipy.linalg.solve_triangular(U, w - q, trans="T", lower=False)
        W1 = W1 - jax.lax.dynamic_slice_in_dim(Hinv11, i, step, axis=0).T @ err
        Err1 = jax.lax.dynamic_update_slice_in_dim(Err1, err, i, axis=0)
        loss = loss + jnp.sum(jnp.where(real[:, None], err**2, 0)) / 2
      if keep_values:
        Q = jax.lax.dynamic_update_slice_in_dim(Q, q, j, axis=0)
      return W1, Err1, Q, loss, state

    W1, Err1, Q, loss, state = jax.lax.fori_loop(0, B // step, step_fn,
                                                 (W1, Err1, Q, loss, state))
    # Lazy batch update of all later rows: W[i2:] -= Hinv[i1:i2, i2:]^T @ Err1. Rows before
    # i1 get zero (Hinv is upper triangular); rows of this block are done and never read.
    W = W - Hinv1.T @ Err1
    return W, Q, loss, state

  Q = jnp.zeros((Kp, N) if keep_values else (), ctype)
  _, Q, loss, state = jax.lax.fori_loop(0, Kp // B, block_step,
                                        (W, Q, jnp.zeros((), ctype), state))
  return (Q[:K] if keep_values else None), state, loss


# ------------------------------------------------------------------------------------------
# Output columns split over a mesh.
# ------------------------------------------------------------------------------------------


class ColumnSplit(NamedTuple):
  """Where a solver's output columns go: ``W``'s dimension 1 split over ``axis`` of ``mesh``.

  Attributes:
    mesh: a ``jax.sharding.Mesh`` (Auto axes; an Explicit mesh is re-made with Auto axes of the
      same devices by :func:`column_split`).
    axis: a mesh axis name or a tuple of them (the columns are split over their product, in
      order, as ``PartitionSpec(None, axis)`` lays them out).
  """

  mesh: Any
  axis: Any

  @property
  def size(self) -> int:
    axes = (self.axis,) if isinstance(self.axis, str) else tuple(self.axis)
    return int(np.prod([self.mesh.shape[a] for a in axes]))

  def spec(self) -> P:
    return P(None, self.axis)

  def sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec())

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())


def _auto(mesh):
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
  return mesh


def column_split(W) -> ColumnSplit | None:
  """The split of ``W``'s output columns, read from its sharding, or ``None``.

  ``W`` is a concrete ``jax.Array`` whose ``NamedSharding`` names mesh axes (of total size
  above 1) on dimension 1 and none on dimension 0; anything else (host arrays, tracers,
  replicated or row-split arrays) gives ``None``: the solver then runs on one device.
  """
  sh = getattr(W, "sharding", None) if isinstance(W, jax.Array) else None
  if not isinstance(sh, NamedSharding) or getattr(W, "ndim", 0) != 2:
    return None
  spec = tuple(sh.spec) + (None,) * (2 - len(tuple(sh.spec)))
  if spec[0] is not None or spec[1] is None:
    return None
  split = ColumnSplit(_auto(sh.mesh), spec[1])
  return split if split.size > 1 else None


def place(a, sharding):
  """``a`` laid out as ``sharding``, also across processes (``a`` then a host array or an array
  every process holds in full, or already a global array)."""
  if a is None:
    return None
  if isinstance(a, jax.Array) and a.sharding == sharding:
    return a
  if sharding.is_fully_addressable:
    return jax.device_put(a, sharding)
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    return jax.jit(lambda v: v, out_shardings=sharding)(a)
  host = np.asarray(a)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place_leaf(leaf, split: ColumnSplit | None):
  """A compressed ``leaf`` with every child laid out as a kernel split ``P(None, axis)`` dictates
  (:func:`compressjax.formats.partition_specs`: codes, scales, values split by output column,
  flat children replicated); unchanged without ``split``."""
  if split is None:
    return leaf
  from compressjax.formats import sharding as fsharding  # pylint: disable=g-import-not-at-top
  specs = fsharding.partition_specs(leaf, split.spec(), dict(split.mesh.shape))
  return jax.tree.map(lambda a, s: place(a, NamedSharding(split.mesh, s)), leaf, specs)


def split_columns(fn: Callable, split: ColumnSplit, in_specs: tuple, out_specs: Any) -> Callable:
  """``fn`` run per device with ``W``'s columns split as ``split`` says (``jax.shard_map``).

  ``in_specs``/``out_specs`` hold ``"cols"`` for arrays split along dimension 1 (output
  columns), ``None`` for replicated ones (``H``, scalars); ``fn`` receives its local columns
  and must reduce what it computes across columns over ``split.axis``.
  """
  to = lambda t: jax.tree.map(lambda s: split.spec() if s == "cols" else P(), t,
                              is_leaf=lambda x: x is None or isinstance(x, str))
  return jax.shard_map(fn, mesh=split.mesh, in_specs=to(in_specs), out_specs=to(out_specs),
                       check_vma=False)


def check_split(n: int, split: ColumnSplit, what: str, multiple: int = 1) -> None:
  """Raises unless the ``n`` output columns split evenly (in multiples of ``multiple``)."""
  if n % (split.size * multiple):
    raise ValueError(
        f"{what}: the {n} output columns cannot be split over mesh axes {split.axis!r} of size "
        f"{split.size}" + (f" in multiples of {multiple}" if multiple > 1 else "") +
        "; replicate W (or shard it over fewer devices)")


def gather_columns(x: jax.Array, axis_name) -> jax.Array:
  """All devices' columns of ``x`` ``(rows, local N)`` side by side (identity without a split)."""
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=1, tiled=True)


def local_columns(full: jax.Array, n_local: int, axis_name) -> jax.Array:
  """This device's columns of a gathered ``(rows, N)`` array (inverse of :func:`gather_columns`)."""
  if axis_name is None:
    return full
  start = jax.lax.axis_index(axis_name) * n_local
  return jax.lax.dynamic_slice_in_dim(full, start, n_local, axis=1)


def whole(a, split: ColumnSplit | None):
  """``a`` whole as an array of this process: with ``split``, gathered from wherever it lies
  (its columns split over the mesh, also across processes) to one local copy; else ``a``.

  For the few steps that need a layer's full view on the host (OWQ's choice of rows, SpQR's
  outlier list): the result is computed from the same values by the same one-device program,
  hence bit-for-bit what one device computes.
  """
  if split is None or a is None:
    return a
  full = place(a, split.replicated())
  return jnp.asarray(full.addressable_data(0))


def psum(x, axis_name):
  """``x`` summed over the devices of ``axis_name`` (identity without a split)."""
  return x if axis_name is None else jax.lax.psum(x, axis_name)
