"""The one OBS solver: block feedback against a direct NumPy recursion, and the GPTQ special case."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax.quantize import gptq_core, obs_core


def _problem(k=48, n=12, seed=0):
  kx, kw, kc = jax.random.split(jax.random.key(seed), 3)
  X = jax.random.normal(kx, (256, k)) @ (jnp.eye(k) + 0.5 * jax.random.normal(kc, (k, k)) / k**0.5)
  W = jax.random.normal(kw, (k, n))
  return np.asarray(X, np.float64), np.asarray(W, np.float64)


def _round(v):
  return np.round(v * 2) / 2


def _direct(W, Hinv, step):
  """Unblocked recursion: after each step, every later row gets U[S, later]^T U[S, S]^-T E."""
  W = W.copy()
  K = W.shape[0]
  Q = np.zeros_like(W)
  for i in range(0, K, step):
    S = slice(i, i + step)
    Q[S] = _round(W[S])
    err = np.linalg.solve(Hinv[S, S].T, W[S] - Q[S])
    W[i + step:] -= Hinv[S, i + step:].T @ err
  return Q


@pytest.mark.parametrize("step,blocksize", [(1, 16), (2, 16), (8, 16), (8, 48), (4, 20)])
def test_sweep_equals_direct_recursion(step, blocksize):
  X, W = _problem()
  H = 2 * X.T @ X / X.shape[0]
  Hinv, *_ = obs_core.hinv_cholesky(jnp.asarray(H, jnp.float32), 0.01)
  rule = lambda st, s: (jnp.round(st.w * 2) / 2, s)
  Q, _, loss = obs_core.sweep(jnp.asarray(W, jnp.float32), Hinv, rule, (),
                              blocksize=blocksize, step=step)
  ref = _direct(W, np.asarray(Hinv, np.float64), step)
  assert np.mean(np.asarray(Q) == ref) > 0.995  # rounding ties may flip in float32
  # The reported loss is the output-error objective of what was chosen: tr(dW^T H dW) / 2
  # (with the damped H, hence the tolerance).
  dW = W - np.asarray(Q, np.float64)
  assert float(loss) == pytest.approx(np.trace(dW.T @ H @ dW) / 2, rel=0.05)


def test_feedback_beats_plain_rounding_for_every_step():
  X, W = _problem(seed=1)
  H = 2 * X.T @ X / X.shape[0]
  Hinv, *_ = obs_core.hinv_cholesky(jnp.asarray(H, jnp.float32), 0.01)
  plain = np.linalg.norm(X @ (W - _round(W)))
  for step in (1, 2, 4, 8):
    Q, _, _ = obs_core.sweep(jnp.asarray(W, jnp.float32), Hinv,
                             lambda st, s: (jnp.round(st.w * 2) / 2, s), (), blocksize=16,
                             step=step)
    assert np.linalg.norm(X @ (W - np.asarray(Q, np.float64))) < 0.9 * plain


def test_gptq_is_the_step_one_rule():
  X, W = _problem(seed=2)
  H = jnp.asarray(2 * X.T @ X / X.shape[0], jnp.float32)
  qw, info = gptq_core.gptq_quantize(jnp.asarray(W, jnp.float32), H, bits=3, group_size=None,
                                     blocksize=16)
  ref, rinfo = gptq_core.gptq_reference(W, H, bits=3, group_size=None)
  assert np.mean(np.asarray(qw.materialize()) == np.asarray(ref.materialize())) > 0.99
  assert float(info["loss"]) == pytest.approx(rinfo["loss"], rel=1e-3)


def test_step_must_divide_blocksize():
  with pytest.raises(ValueError, match="multiple of step=8"):
    obs_core.sweep(jnp.zeros((48, 4)), jnp.eye(48), lambda st, s: (st.w, s), (), blocksize=20,
                   step=8)


def test_without_values_the_state_and_loss_are_the_same():
  X, W = _problem(seed=3)
  Hinv, *_ = obs_core.hinv_cholesky(jnp.asarray(2 * X.T @ X / X.shape[0], jnp.float32), 0.01)

  def rule(st, total):
    q = jnp.round(st.w * 2) / 2
    return q, total + jnp.sum(q)

  Q, s1, l1 = obs_core.sweep(jnp.asarray(W, jnp.float32), Hinv, rule, 0.0, blocksize=20)
  none, s2, l2 = obs_core.sweep(jnp.asarray(W, jnp.float32), Hinv, rule, 0.0, blocksize=20,
                                keep_values=False)
  assert none is None and Q.shape == W.shape
  assert float(s1) == float(s2) == pytest.approx(float(jnp.sum(Q)))
  assert float(l1) == float(l2)
  assert obs_core.padded_length(48, 20) == 60 and obs_core.padded_length(48, 128) == 48
