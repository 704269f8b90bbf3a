"""QuIP#'s E8P ("E8 padded") lattice codebook and BlockLDLQ rounding. Pure math on arrays.

The codebook (Tseng et al. 2024, Sec. 4.2; quip-sharp ``lib/codebook/latticee8_padded12.py``)
holds ``2**16`` vectors of ``R^8``, so 8 weights cost 16 bits (2 bits per weight):

* ``S`` (:func:`abs_grid`), a 256-entry table of *absolute values*: the 227 vectors of
  ``{1/2, 3/2, 5/2}^8`` with squared norm ``<= 10`` (the absolute values of the points of
  ``D8 + 1/2`` (half-integer vectors with even coordinate sum) in the ball of radius
  ``sqrt(10)``), in lexicographic order, followed by 29 chosen vectors of squared norm 12 with
  five coordinates ``3/2`` and three ``1/2`` (the table of the reference, in its order).
  The reference's list repeats one vector (entries 248 and 254 are both
  ``(1, 3, 3, 3, 1, 1, 3, 3) / 2``); it is kept so that a code means what it means in QuIP#,
  hence ``2**16 - 256`` distinct codewords (codes of entry 254 duplicate those of 248).
* Signs: a codeword is ``s * S[a] + t`` with ``s`` in ``{-1, +1}^8`` such that the number of
  negative signs has the parity of ``sum(S[a])`` (then ``s * S[a]`` has an even sum, i.e. lies
  in ``D8 + 1/2`` which is a coset of ``D8`` inside ``E8``), and a shift ``t = +-1/4``
  (all coordinates). So every codeword lies in ``E8 + 1/4`` or ``E8 - 1/4``.
* The 16-bit code (the reference's python ``get_full_grid`` layout, without its ``-2**15``
  int16 offset): bits 15..8 are the table index ``a``; bit ``8 - k`` (``k = 1..7``) says that
  coordinate ``k`` is negative; coordinate 0's sign is implied by the parity rule; bit 0 is
  the shift: 1 for ``+1/4``, 0 for ``-1/4`` (the paper's 8 + 7 + 1 bit split).

Nearest-codeword rounding (:func:`nearest`) is exact (the same result as a brute-force search
over all ``2**16`` codewords, up to ties): for each shift ``t``, ``y = x - t``; for each table
entry ``a`` the best signs are ``sign(y)``, and if their parity is wrong the single cheapest
coordinate is flipped (cost ``4 S[a]_k |y_k|``); the best entry of each shift is kept and the
better shift wins. (The reference's ``fast_quantize_part`` searches a truncated part of the
table; here every entry is scored, 256 x 8 per vector.)

Scale (as QuIP#, ``lib/algo/quip.py::quantize``): one scale per layer,
``Wscale = RMS(W) / scale_override`` of the (incoherence-processed) weight, with
``scale_override = 0.9`` as in every E8P12 script of the reference (``--scale_override 0.9``);
the codebook rounds ``W / Wscale`` and the layer is ``Wscale * Q``.

BlockLDLQ (:func:`e8p_quantize`; paper Alg. 3, the reference's ``LDLQ``): the OBS recursion of
:mod:`compressjax.quantize.obs_core` with ``step = 8``: the 8 consecutive input rows
``W[8b:8b+8, n]`` of each output column ``n`` are one vector, rounded jointly, and the step's
error is fed into the remaining rows by the block update (equal to BlockLDLQ's feedback
``(W - Q) L`` with the block LDL factor, here in forward order with the Cholesky factor of
``H^{-1}``). Optional ``tune_iters`` passes (the reference's ``quip_tune_iters``) then re-round
each 8-row block to the minimiser of ``tr((W - Q)^T H (W - Q))`` with all other rows fixed,
``Q_S + H_SS^{-1} H_S: (W - Q)`` (block coordinate descent; the tests check that it lowers
the output error).

Split over a mesh (``split=``, :mod:`compressjax.quantize.obs_core`): every step acts on each
output column alone given ``H``, so each device solves its own columns with the replicated
``H``; the layer scale is computed beforehand from the whole ``W`` by the program one device
runs, so the codes and the scale equal one device's. Behind incoherence processing the
split is of the rotated ``Wt = H_in^T diag(su) W diag(sv) H_out`` under the rotated Hessian (the
output-side Hadamard mixes ``W``'s columns, but it is applied before the solver sees ``Wt``, whose
columns are then independent like any weight's).

References:
  Tseng, Chee, Sun, Kuleshov, De Sa, "QuIP#: Even Better LLM Quantization with Hadamard
  Incoherence and Lattice Codebooks", ICML 2024, arXiv:2402.04396 (Sec. 4.2 E8P, Alg. 3
  BlockLDLQ). Cornell-RelaxML/quip-sharp ``lib/codebook/latticee8_padded12.py``,
  ``lib/algo/quip.py``.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.quantize import obs_core

# The papers' variable names (H, Hinv, W, Q, ...) are kept on purpose.
# pylint: disable=invalid-name

__all__ = ["CODESZ", "ABS_GRID", "abs_grid", "all_codewords", "decode", "e8p_quantize",
           "e8p_scale", "nearest", "tune", "DEFAULT_SCALE_OVERRIDE", "E81B_GRID", "e81b_grid",
           "e81b_decode", "e81b_nearest", "RVQ_DEFAULTS", "rvq_nearest", "rvq_quantize"]

#: Vector dimension: 8 weights per 16-bit code.
CODESZ = 8
#: QuIP#'s choice for E8P12 (``--scale_override 0.9``): ``Wscale = RMS(W) / 0.9``.
DEFAULT_SCALE_OVERRIDE = 0.9

# The 29 squared-norm-12 entries of the reference's table (digits are 2 * |coordinate|).
_NORM12 = (
    "31113333", "13113333", "11313333", "11133333", "33313311", "33313131", "33311331",
    "33313113", "33311313", "33311133", "33133311", "33133131", "33131331", "33133113",
    "33131313", "33131133", "31333311", "31333131", "31331331", "31333113", "31331313",
    "13331133", "13333311", "13333131", "13331331", "13333113", "13331313", "13331133",
    "33113331",
)


def abs_grid() -> np.ndarray:
  """The ``(256, 8)`` float32 table ``S`` of absolute values (module docstring)."""
  halves = (0.5, 1.5, 2.5)
  d8 = [v for v in itertools.product(halves, repeat=CODESZ) if sum(c * c for c in v) <= 10]
  norm12 = [[int(ch) / 2 for ch in row] for row in _NORM12]
  table = np.asarray(d8 + norm12, np.float32)
  assert table.shape == (256, CODESZ), table.shape
  return table


#: The table as a module constant (never a pytree child: formats decode from it).
ABS_GRID = abs_grid()
# Parity of sum(S[a]) (an integer): the parity of the number of negative signs.
_ABS_PARITY = (ABS_GRID.sum(axis=1).astype(np.int64) % 2).astype(np.int32)
# Bit of the code holding coordinate k's sign (k = 1..7); coordinate 0 has none.
_SIGN_SHIFTS = np.arange(CODESZ, 0, -1, dtype=np.int32)  # [8, 7, ..., 1]; entry 0 unused


@functools.partial(jax.jit, static_argnames=("dtype",))
def decode(codes: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Codewords ``(..., 8)`` of 16-bit ``codes`` (any integer dtype holding ``0 .. 2**16 - 1``).

  Examples:
    >>> import jax.numpy as jnp
    >>> decode(jnp.asarray([1, 0], jnp.uint16)).tolist()
    [[0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75], [0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]]
  """
  c = jnp.asarray(codes).astype(jnp.int32)
  a = (c >> 8) & 0xFF
  neg = (c[..., None] >> jnp.asarray(_SIGN_SHIFTS)) & 1  # (..., 8); column 0 is bit 8 (of a)
  neg_rest = neg[..., 1:]
  neg0 = (jnp.sum(neg_rest, axis=-1) + jnp.asarray(_ABS_PARITY)[a]) & 1
  neg = jnp.concatenate([neg0[..., None], neg_rest], axis=-1)
  vals = jnp.asarray(ABS_GRID, dtype)[a] * (1 - 2 * neg).astype(dtype)
  shift = jnp.where((c & 1) == 1, 0.25, -0.25).astype(dtype)
  return vals + shift[..., None]


def all_codewords() -> jax.Array:
  """All ``2**16`` codewords, ``(65536, 8)``, row ``c`` decoding code ``c``."""
  return decode(jnp.arange(2**16, dtype=jnp.int32))


def _nearest_coset(y: jax.Array):
  """Nearest ``s * S[a]`` (signs with the parity rule) to each row of ``y`` ``(M, 8)``.

  Returns ``(dist, a, neg)``: squared distance, table index, ``(M, 8)`` negative-sign mask.
  """
  S = jnp.asarray(ABS_GRID, y.dtype)
  par = jnp.asarray(_ABS_PARITY)
  ay = jnp.abs(y)
  neg = (y < 0).astype(jnp.int32)
  wrong = (jnp.sum(neg, axis=-1, keepdims=True) & 1) != par[None, :]  # (M, 256)
  flip_cost = S[None, :, :] * ay[:, None, :]  # (M, 256, 8): a_k |y_k|
  k_flip = jnp.argmin(flip_cost, axis=-1)  # (M, 256)
  min_cost = jnp.min(flip_cost, axis=-1)
  score = 2 * ay @ S.T - jnp.sum(S * S, axis=-1)[None, :] - jnp.where(wrong, 4 * min_cost, 0)
  a = jnp.argmax(score, axis=-1)  # (M,)
  best = jnp.take_along_axis(score, a[:, None], axis=-1)[:, 0]
  dist = jnp.sum(y * y, axis=-1) - best
  fix = jnp.take_along_axis(wrong, a[:, None], axis=-1)[:, 0]
  k = jnp.take_along_axis(k_flip, a[:, None], axis=-1)[:, 0]
  flip = jnp.logical_and(fix[:, None], jnp.arange(CODESZ)[None, :] == k[:, None])
  neg = jnp.where(flip, 1 - neg, neg)
  return dist, a, neg


@jax.jit
def nearest(x: jax.Array):
  """Exact nearest E8P codeword of each 8-vector: ``(codes uint16 (...,), values (..., 8))``.

  Both shifts (``+-1/4``) are searched over the whole table and the nearer is kept.

  Examples:
    >>> import jax.numpy as jnp
    >>> codes, q = nearest(jnp.asarray([0.8, -0.7, 0.6, 0.7, 0.75, 0.8, 0.7, -0.6]))
    >>> int(codes), q.tolist()  # table entry 0, coordinates 1 and 7 negative (bits 7, 1), +1/4
    (131, [0.75, -0.25, 0.75, 0.75, 0.75, 0.75, 0.75, -0.25])
  """
  x = jnp.asarray(x)
  if x.shape[-1] != CODESZ:
    raise ValueError(f"nearest expects vectors of length {CODESZ}, got shape {x.shape}")
  lead = x.shape[:-1]
  xf = x.reshape(-1, CODESZ)
  if not jnp.issubdtype(xf.dtype, jnp.floating):
    xf = xf.astype(jnp.float32)
  d_p, a_p, n_p = _nearest_coset(xf - 0.25)
  d_m, a_m, n_m = _nearest_coset(xf + 0.25)
  plus = d_p < d_m
  a = jnp.where(plus, a_p, a_m)
  neg = jnp.where(plus[:, None], n_p, n_m)
  sign_bits = jnp.sum(neg[:, 1:] << jnp.asarray(_SIGN_SHIFTS[1:]), axis=-1)
  codes = (a << 8) | sign_bits | plus.astype(jnp.int32)
  values = (jnp.asarray(ABS_GRID, xf.dtype)[a] * (1 - 2 * neg).astype(xf.dtype)
            + jnp.where(plus, 0.25, -0.25).astype(xf.dtype)[:, None])
  return codes.astype(jnp.uint16).reshape(lead), values.reshape(lead + (CODESZ,))


def e8p_scale(W: jax.Array, scale_override: float = DEFAULT_SCALE_OVERRIDE) -> jax.Array:
  """QuIP#'s per-layer scale ``RMS(W) / scale_override`` (float32 scalar; 1 for ``W = 0``)."""
  rms = jnp.sqrt(jnp.mean(jnp.square(W.astype(jnp.float32))))
  return jnp.where(rms > 0, rms / scale_override, 1.0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("scale_override",))
def _layer_scale(W, H, *, scale_override):
  """:func:`e8p_scale` of the weight BlockLDLQ rounds (dead input rows zeroed).

  A program of its own, run on the whole ``W`` before any split, so that a split solver and
  one device use the bit-identical scale (a sum of squares reduced per device and then across
  devices adds in another order and moves the scale by an ulp).
  """
  W, _, _ = obs_core.drop_dead(W.astype(jnp.float32), H.astype(jnp.float32))
  return e8p_scale(W, scale_override)


def _e8p_round(x: jax.Array):
  """E8P rounding as a codebook rule: ``((codes,), values)`` of 8-vectors ``x`` ``(M, 8)``."""
  codes, vals = nearest(x)
  return (codes,), vals


def _round_columns(w: jax.Array, rnd=_e8p_round):
  """Rounds ``w`` ``(8, N)`` column-wise with rule ``rnd``: ``(codes tuple of (N,), q (8, N))``."""
  codes, vals = rnd(w.T)
  return codes, vals.T.astype(w.dtype)


def _tune(Wn, Q, codes, H, iters, rnd):
  """:func:`tune` for any rounding rule ``rnd``; ``codes`` a tuple of ``(K // 8, N)`` arrays."""
  K, N = Wn.shape
  nb = K // CODESZ
  Hb = H.reshape(nb, CODESZ, K)
  Hss = jax.vmap(lambda b: jax.lax.dynamic_slice(H, (CODESZ * b, CODESZ * b),
                                                  (CODESZ, CODESZ)))(jnp.arange(nb))
  Hss_inv = jnp.linalg.inv(Hss)  # (nb, 8, 8)

  def block(b, carry):
    Q, D, codes = carry  # D = Wn - Q
    i = b * CODESZ
    q_old = jax.lax.dynamic_slice_in_dim(Q, i, CODESZ, axis=0)
    target = q_old + Hss_inv[b] @ (Hb[b] @ D)
    c, q = _round_columns(target, rnd)
    Q = jax.lax.dynamic_update_slice_in_dim(Q, q, i, axis=0)
    D = jax.lax.dynamic_update_slice_in_dim(
        D, jax.lax.dynamic_slice_in_dim(D, i, CODESZ, axis=0) + q_old - q, i, axis=0)
    codes = tuple(jax.lax.dynamic_update_index_in_dim(a, ci, b, axis=0)
                  for a, ci in zip(codes, c))
    return Q, D, codes

  def one_pass(_, carry):
    return jax.lax.fori_loop(0, nb, block, carry)

  Q, _, codes = jax.lax.fori_loop(0, iters, one_pass, (Q, Wn - Q, tuple(codes)))
  return Q, codes


def tune(Wn: jax.Array, Q: jax.Array, codes: jax.Array, H: jax.Array, iters: int):
  """``iters`` passes of block coordinate descent on ``tr((Wn - Q)^T H (Wn - Q))``.

  Each 8-row block ``S`` (in order) is re-rounded to ``nearest(Q_S + H_SS^{-1} H_S: (Wn - Q))``,
  the reference's ``quip_tune_iters`` step. Returns ``(Q, codes)``.
  """
  Q, (codes,) = _tune(Wn, Q, (codes,), H, iters, _e8p_round)
  return Q, codes


def _block_ldlq(W, H, scale, rnd, code_dtypes, *, percdamp, blocksize, tune_iters,
                axis_name=None):
  """BlockLDLQ of ``W`` under ``H`` with the 8-dimensional rounding rule ``rnd``.

  ``rnd(x (M, 8)) -> (codes tuple of (M,) arrays of ``code_dtypes``, values (M, 8))``.
  ``scale`` is the layer scale (:func:`_layer_scale`). Returns ``(codes tuple of (K // 8, N),
  scale, info)`` (see :func:`e8p_quantize`).

  With ``axis_name`` (inside :func:`_split_ldlq`'s ``shard_map``) ``W`` is this device's output
  columns: every step (rounding 8 rows of one column, the error feedback through the replicated
  ``Hinv``, the tune passes) acts per column; the one layer-wide quantity, the scale, comes
  in computed from the whole ``W``, and the loss is summed over the devices.
  """
  K, N = W.shape
  if K % CODESZ:
    raise ValueError(f"E8P needs the input width K to be a multiple of {CODESZ}, got K={K}")
  if blocksize % CODESZ:
    raise ValueError(f"blocksize must be a multiple of {CODESZ}, got {blocksize}")
  W = W.astype(jnp.float32)
  H = H.astype(jnp.float32)
  W, H, dead = obs_core.drop_dead(W, H)
  Hinv, rel, damp, ok = obs_core.hinv_cholesky(H, percdamp)
  Wn = W / scale
  nb_pad = obs_core.padded_length(K, blocksize) // CODESZ

  def rule(step: obs_core.Step, codes):
    c, q = _round_columns(step.w, rnd)
    codes = tuple(jax.lax.dynamic_update_index_in_dim(a, ci, step.j // CODESZ, axis=0)
                  for a, ci in zip(codes, c))
    return q, codes

  codes0 = tuple(jnp.zeros((nb_pad, N), dt) for dt in code_dtypes)
  Q, codes, loss = obs_core.sweep(Wn, Hinv, rule, codes0, blocksize=blocksize, step=CODESZ)
  codes = tuple(c[:K // CODESZ] for c in codes)
  if tune_iters:
    Hd = H + damp * jnp.eye(K, dtype=H.dtype)
    Q, codes = _tune(Wn, Q, codes, Hd, tune_iters, rnd)
  info = {"loss": obs_core.psum(loss, axis_name), "percdamp": rel, "damp": damp,
          "cholesky_ok": ok, "dead": dead}
  return codes, scale, info


def _split_ldlq(solve, W, H, split: obs_core.ColumnSplit | None, n_codes: int, *,
                scale_override, **kw):
  """``solve(W, H, scale, **kw)`` (a jitted BlockLDLQ taking ``axis_name``) with ``W``'s output
  columns split over ``split`` (``None``: one device). The scale is computed first from the
  whole ``W`` (gathered: ``K N`` floats) by the same program either way. Codes come back split
  ``P(None, axis)``; the scale and ``info`` replicated."""
  if split is None:
    return solve(W, H, _layer_scale(W, H, scale_override=scale_override), **kw)
  obs_core.check_split(W.shape[1], split, "E8P BlockLDLQ")
  scale = _layer_scale(obs_core.whole(W, split), obs_core.whole(H, split),
                       scale_override=scale_override)
  fn = obs_core.split_columns(functools.partial(solve, axis_name=split.axis, **kw), split,
                              in_specs=("cols", None, None),
                              out_specs=("cols",) * n_codes + (None, None))
  rep = split.replicated()
  return jax.jit(fn)(obs_core.place(W, split.sharding()), obs_core.place(H, rep),
                     obs_core.place(scale, rep))


@functools.partial(jax.jit, static_argnames=("percdamp", "blocksize", "tune_iters",
                                             "axis_name"))
def _e8p(W, H, scale, *, percdamp, blocksize, tune_iters, axis_name=None):
  (codes,), scale, info = _block_ldlq(W, H, scale, _e8p_round, (jnp.uint16,),
                                      percdamp=percdamp, blocksize=blocksize,
                                      tune_iters=tune_iters, axis_name=axis_name)
  return codes, scale, info


def e8p_quantize(W: jax.Array, H: jax.Array, *, percdamp: float = 0.01, blocksize: int = 128,
                 scale_override: float = DEFAULT_SCALE_OVERRIDE, tune_iters: int = 0,
                 split: obs_core.ColumnSplit | None = None):
  """BlockLDLQ with the E8P codebook of one ``(K, N)`` weight under its ``(K, K)`` Hessian.

  Args:
    W: ``(K, N)`` weight (``y = x @ W``), ``K`` a multiple of 8; ideally incoherence-processed
      (QuIP#'s setting: its entries then look Gaussian and one scale fits the whole layer).
    H: ``(K, K)`` input Hessian proxy (``2 X^T X / n``).
    percdamp: relative damping of ``H`` (:func:`obs_core.hinv_cholesky`).
    blocksize: rows per lazy batch update (a multiple of 8).
    scale_override: ``Wscale = RMS(W) / scale_override``.
    tune_iters: extra coordinate-descent passes (:func:`tune`).
    split: solve with ``W``'s output columns split over mesh axes
      (:class:`~compressjax.quantize.obs_core.ColumnSplit`, e.g. ``obs_core.column_split(W)``):
      each device runs BlockLDLQ on its ``N / devices`` columns with the replicated ``H``; the
      layer scale is computed from the whole ``W`` first, so codes and scale equal one device's. ``codes`` then
      come back split ``P(None, axis)``. ``None``: one device (jittable; the split path places
      arrays and is not).

  Returns:
    ``(codes, scale, info)``: ``codes`` ``(K // 8, N)`` uint16 with ``codes[b, n]`` encoding
    ``W[8b:8b+8, n]``, ``scale`` a float32 scalar (``W ~ scale * decode(codes)``), and ``info``
    with the solver's ``loss`` (in units of the scaled weight) and the damping used.
  """
  return _split_ldlq(_e8p, W, H, split, 1, percdamp=percdamp, blocksize=blocksize,
                     scale_override=scale_override, tune_iters=tune_iters)


# ------------------------------------------------------------------------------------------
# Residual vector quantization: QuIP#'s 3- and 4-bit modes (E8P12RVQ3B, E8P12RVQ4B).
# ------------------------------------------------------------------------------------------


def e81b_grid() -> np.ndarray:
  """The ``(256, 8)`` float32 table of QuIP#'s 1-bit E8 codebook ``E81B``, in the reference's order.

  The 241 points of ``E8`` (all-integer or all-half-odd vectors with an even coordinate sum)
  with squared norm ``<= 2`` (the origin and the 240 roots), listed as the reference
  enumerates them (``get_e81bgrid``: the integer vectors of ``[-4, 3]^8`` in lexicographic
  order, then the half-odd vectors of ``[-7/2, 7/2]^8`` in lexicographic order, filtered), then
  15 of the 16 squared-norm-4 points ``+-2 e_k``: ``+2 e_0 .. +2 e_7``, ``-2 e_0 .. -2 e_6``
  (the reference leaves out ``-2 e_7``). An 8-bit index per 8 weights: 1 bit per weight.

  Only coordinates in ``{-1, 0, 1}`` (integer part) and ``{-1/2, 1/2}`` (half-odd part) can have
  squared norm ``<= 2``, so those small products are enumerated; lexicographic order over them
  is the reference's order over the larger ranges (the filter keeps the relative order).
  """
  ints = [v for v in itertools.product((-1, 0, 1), repeat=CODESZ)
          if sum(c * c for c in v) <= 2 and sum(v) % 2 == 0]
  halves = [v for v in itertools.product((-0.5, 0.5), repeat=CODESZ) if sum(v) % 2 == 0]
  norm4 = [tuple(2.0 if k == i else 0.0 for k in range(CODESZ)) for i in range(CODESZ)]
  norm4 += [tuple(-2.0 if k == i else 0.0 for k in range(CODESZ)) for i in range(CODESZ - 1)]
  table = np.asarray(ints + halves + norm4, np.float32)
  assert table.shape == (256, CODESZ), table.shape
  return table


#: The E81B table as a module constant.
E81B_GRID = e81b_grid()

#: Per-mode defaults of the reference codebooks: ``bits -> (scale_override, resid_scale)``.
#: ``scale_override`` is the codebook's ``opt_scale`` (``Wscale = RMS(W) / opt_scale`` when no
#: ``--scale_override`` is given: the 3-bit scripts give none; the 2-bit ones give 0.9), and
#: ``resid_scale`` its ``opt_resid_scale`` (the residual is rounded at ``resid_scale`` times the
#: first stage's scale): E8P12RVQ3B ``opt_scale = 0.98``, ``opt_resid_scale = 2.04``;
#: E8P12RVQ4B ``opt_scale = 1.03``, ``opt_resid_scale = 3.45``.
RVQ_DEFAULTS = {2: (DEFAULT_SCALE_OVERRIDE, None), 3: (0.98, 2.04), 4: (1.03, 3.45)}


@functools.partial(jax.jit, static_argnames=("dtype",))
def e81b_decode(codes: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Points ``(..., 8)`` of 8-bit E81B ``codes`` (row ``c`` of :data:`E81B_GRID`).

  Examples:
    >>> import jax.numpy as jnp
    >>> e81b_decode(jnp.asarray([56, 255], jnp.uint8)).tolist()  # the origin, then -2 e_6
    [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -2.0, 0.0]]
  """
  return jnp.asarray(E81B_GRID, dtype)[jnp.asarray(codes).astype(jnp.int32)]


@jax.jit
def e81b_nearest(x: jax.Array):
  """Exact nearest E81B point of each 8-vector (all 256 scored): ``(codes uint8, values)``."""
  x = jnp.asarray(x)
  if x.shape[-1] != CODESZ:
    raise ValueError(f"e81b_nearest expects vectors of length {CODESZ}, got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  G = jnp.asarray(E81B_GRID, x.dtype)
  score = 2 * x @ G.T - jnp.sum(G * G, axis=-1)
  idx = jnp.argmax(score, axis=-1)
  return idx.astype(jnp.uint8), G[idx]


def _check_bits(bits):
  if bits not in (3, 4):
    raise ValueError(f"RVQ bits must be 3 (E8P + E81B) or 4 (E8P + E8P), got {bits!r}")


@functools.partial(jax.jit, static_argnames=("bits", "resid_scale"))
def rvq_nearest(x: jax.Array, bits: int = 3, resid_scale: float | None = None):
  """QuIP#'s residual vector quantization of 8-vectors ``x`` (``E8P12RVQ3B`` / ``E8P12RVQ4B``).

  ``x`` is first rounded to its nearest E8P codeword ``v1`` (:func:`nearest`); the residual,
  magnified by ``resid_scale``, ``r = (x - v1) resid_scale``, is rounded to the nearest point
  ``v2`` of the second codebook (``bits=3``: E81B, :func:`e81b_nearest`; ``bits=4``: E8P
  again), and ``x ~ v1 + v2 / resid_scale``. Both stages are exact nearest searches (the
  reference's first stage searches a truncated table). Since E81B holds the origin, the 3-bit
  result is never farther from ``x`` than ``v1``.

  Args:
    x: ``(..., 8)`` vectors (already divided by the layer scale).
    bits: 3 or 4.
    resid_scale: the residual's magnification; default the reference's (:data:`RVQ_DEFAULTS`).

  Returns:
    ``(codes, resid_codes, values)``: ``uint16`` E8P codes ``(...,)``, second-stage codes
    ``(...,)`` (``uint8`` E81B or ``uint16`` E8P), and the ``(..., 8)`` values they decode to.
  """
  _check_bits(bits)
  rs = RVQ_DEFAULTS[bits][1] if resid_scale is None else float(resid_scale)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  c1, v1 = nearest(x)
  r = (x - v1) * rs
  c2, v2 = e81b_nearest(r) if bits == 3 else nearest(r)
  return c1, c2, v1 + v2 / rs


@functools.partial(jax.jit, static_argnames=("bits", "percdamp", "blocksize", "resid_scale",
                                             "tune_iters", "axis_name"))
def _rvq(W, H, scale, *, bits, percdamp, blocksize, resid_scale, tune_iters, axis_name=None):
  def rnd(x):
    c1, c2, v = rvq_nearest(x, bits=bits, resid_scale=resid_scale)
    return (c1, c2), v

  dt2 = jnp.uint8 if bits == 3 else jnp.uint16
  (codes, resid_codes), scale, info = _block_ldlq(
      W, H, scale, rnd, (jnp.uint16, dt2), percdamp=percdamp, blocksize=blocksize,
      tune_iters=tune_iters, axis_name=axis_name)
  return codes, resid_codes, scale, info


def rvq_quantize(W: jax.Array, H: jax.Array, *, bits: int = 3, percdamp: float = 0.01,
                 blocksize: int = 128, scale_override: float | None = None,
                 resid_scale: float | None = None, tune_iters: int = 0,
                 split: obs_core.ColumnSplit | None = None):
  """BlockLDLQ with QuIP#'s 3- or 4-bit RVQ codebook (:func:`rvq_nearest` per 8-row block).

  The same recursion as :func:`e8p_quantize` (the reference's ``LDLQ`` calls
  ``codebook.quantize`` on each block, whatever the codebook), with the joint two-stage
  rounding as the rule and the codebook's scale choices (:data:`RVQ_DEFAULTS`).

  Args:
    W, H, percdamp, blocksize, tune_iters, split: as :func:`e8p_quantize` (with ``split``
      both code arrays come back split ``P(None, axis)``).
    bits: 3 (E8P + E81B) or 4 (E8P + E8P).
    scale_override: ``Wscale = RMS(W) / scale_override``; default the codebook's ``opt_scale``.
    resid_scale: default the codebook's ``opt_resid_scale``.

  Returns:
    ``(codes, resid_codes, scale, info)``: ``(K // 8, N)`` ``uint16`` E8P codes, ``(K // 8, N)``
    second-stage codes (``uint8`` E81B for 3 bits, ``uint16`` E8P for 4), the float32 layer
    scale, and ``info`` as :func:`e8p_quantize`'s. The weight is
    ``scale * (decode(codes) + decode2(resid_codes) / resid_scale)``.
  """
  _check_bits(bits)
  so_default, rs_default = RVQ_DEFAULTS[bits]
  so = so_default if scale_override is None else float(scale_override)
  rs = rs_default if resid_scale is None else float(resid_scale)
  return _split_ldlq(_rvq, W, H, split, 2, bits=bits, percdamp=float(percdamp),
                     blocksize=blocksize, scale_override=so, resid_scale=rs,
                     tune_iters=tune_iters)
