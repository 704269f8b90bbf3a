"""Block-wise fine-tuning of a compressed block to the uncompressed block's outputs.

After the calibration engine compresses a block, its continuous parameters (the trainable
children of its compressed leaves: scales, zeros, float outliers, dense low-rank factors, ...,
and optionally its norms) are tuned with Adam to minimize the mean squared error between the
compressed block's outputs and the *uncompressed* block's outputs on the same calibration
inputs. Discrete children (codes, masks, indices) never enter :func:`jax.grad` and come back
bit-identical. This is AQLM's ``finetune_groupwise`` (also used by SpQR's follow-ups), offered
as an option of every calibrated method: ``run_sequential(..., block_finetune=BlockFinetune())``.

Trainable leaves are trained in ``float32`` master copies; the forward pass uses them cast to the
stored dtype (so the loss is that of what will be stored) and the result is cast back.

References:
  Egiazarian et al. 2024, "Extreme Compression of Large Language Models via Additive
  Quantization" (AQLM), arXiv:2401.06118, Sec. 3.4 (fine-tuning each block's continuous
  parameters to the original block's outputs); Kingma & Ba 2015, Adam.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressjax.finetune.masks import NORMS, _mask, combine, partition, trainable_mask
from compressjax.transforms.selection import Selector

__all__ = ["BlockFinetune", "BlockTuner"]


def _selector_key(s: Selector) -> str:
  if callable(s):
    return getattr(s, "__qualname__", type(s).__name__)
  if isinstance(s, (list, tuple)):
    return "[" + ",".join(_selector_key(x) for x in s) + "]"
  return repr(s)


@dataclasses.dataclass(frozen=True)
class BlockFinetune:
  """Settings of block-wise fine-tuning (validated when built).

  Attributes:
    steps: Adam steps per block (each on ``batch_size`` calibration windows).
    lr: Adam learning rate (AQLM: ``1e-4``).
    batch_size: windows per step (at most the number of calibration windows).
    train_norms: also train the block's normalization parameters (:data:`NORMS`).
    where: which compressed leaves are tuned (a selector over full paths such as
      ``layers/3/attn/q_proj/kernel``); ``None``: every compressed leaf of the block.
    train_dense: other dense floating leaves of the block to tune (a selector; ``()``: none).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    seed: seed of the window order (block ``i`` uses ``(seed, i)``, so a resumed run draws
      the same batches as an uninterrupted one).
  """

  steps: int = 100
  lr: float = 1e-4
  batch_size: int = 8
  train_norms: bool = False
  where: Selector = None
  train_dense: Selector = ()
  b1: float = 0.9
  b2: float = 0.999
  seed: int = 0

  def __post_init__(self):
    for arg in ("steps", "batch_size"):
      v = getattr(self, arg)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"block_finetune: {arg} must be a positive int, got {v!r}")
    lr = self.lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
      raise ValueError(f"block_finetune: lr must be a finite float > 0, got {lr!r}")
    for arg in ("b1", "b2"):
      v = getattr(self, arg)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise ValueError(f"block_finetune: {arg} must be a float in [0, 1), got {v!r}")
    if not isinstance(self.train_norms, bool):
      raise ValueError(f"block_finetune: train_norms must be a bool, got {self.train_norms!r}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
      raise ValueError(f"block_finetune: seed must be an int, got {self.seed!r}")

  @property
  def dense_selector(self) -> Selector:
    """The dense leaves trained: ``train_dense`` plus :data:`NORMS` with ``train_norms``."""
    extra = list(self.train_dense) if isinstance(self.train_dense, (list, tuple)) else [
        self.train_dense]
    return tuple(extra + ([NORMS] if self.train_norms else []))

  def key(self) -> str:
    """A stable description (part of the engine's resume fingerprint)."""
    return (f"steps={self.steps},lr={self.lr!r},bs={self.batch_size},norms={self.train_norms},"
            f"where={_selector_key(self.where)},dense={_selector_key(self.train_dense)},"
            f"b=({self.b1!r},{self.b2!r}),seed={self.seed}")

  def check(self, planned: Mapping[str, Any]) -> None:
    """Fails before any work when ``where``/``train_dense`` select nothing in the planned
    (abstract, compressed) block parameters ``{full path: leaf}``."""
    try:
      trainable_mask(dict(planned), where=self.where, train_dense=self.dense_selector)
    except ValueError as e:
      raise ValueError(f"block_finetune: {e} (among the blocks' planned parameters)") from e

  def windows(self, block_index: int, n: int) -> np.ndarray:
    """``(steps, min(batch_size, n))`` window indices: epochs of shuffled windows."""
    bs = min(self.batch_size, n)
    rng = np.random.default_rng([int(self.seed), int(block_index)])
    need = self.steps * bs
    order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])
    return order[:need].reshape(self.steps, bs).astype(np.int32)


def _scalar(a) -> float:
  """A replicated scalar as a Python float (also when it spans several processes)."""
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    a = a.addressable_data(0)
  return float(a)


def _sq_err(model, block, x, y):
  out = model.apply_block(block, x, None)
  return jnp.square(out.astype(jnp.float32) - y.astype(jnp.float32))


class BlockTuner:
  """The jitted fine-tuning programs of one engine run (compiled once, reused by every block).

  ``model`` is a :class:`compressjax.blocks.BlockModel`. :meth:`tune` takes a block's flat
  parameters ``{path relative to prefix: leaf}`` (selectors see ``prefix + path``), its inputs ``xs`` and the uncompressed block's outputs
  ``ys`` (both ``(nb, bs, T, D)``, the first ``n`` windows real) and returns the tuned block and
  ``(mse_before, mse_after)`` over the real windows.
  """

  def __init__(self, model, cfg: BlockFinetune):
    self.model = model
    self.cfg = cfg
    self.opt = optax.adam(cfg.lr, b1=cfg.b1, b2=cfg.b2)

    def _finetune_step(train, opt_state, stored, frozen, xs, ys, idx):
      flat = lambda a: a.reshape((-1,) + a.shape[2:])
      xb, yb = flat(xs)[idx], flat(ys)[idx]

      def loss(t):
        cast = jax.tree.map(lambda m, s: m.astype(s.dtype), t, stored)
        return jnp.mean(_sq_err(model, combine(cast, frozen), xb, yb))

      value, grads = jax.value_and_grad(loss)(train)
      updates, opt_state = self.opt.update(grads, opt_state, train)
      return optax.apply_updates(train, updates), opt_state, value

    def _block_mse(block, xs, ys, weights):
      per = jax.lax.map(lambda a: jnp.mean(_sq_err(model, block, a[0], a[1]), axis=(1, 2)),
                        (xs, ys))  # (nb, bs) mean over tokens and features
      return jnp.sum(per * weights) / jnp.sum(weights)

    self.step = jax.jit(_finetune_step)
    self.mse = jax.jit(_block_mse)

  def tune(self, block_index: int, prefix: str, block: dict[str, Any], xs, ys, n: int, *,
           put=lambda a: a, on_step=None) -> tuple[dict[str, Any], tuple[float, float]]:
    """Tunes ``block`` (see the class docstring); ``put`` places host arrays (engine mesh);
    ``on_step(step, loss)`` reports progress."""
    full, _ = _mask({prefix + p: v for p, v in block.items()}, self.cfg.where,
                    self.cfg.dense_selector)
    mask = {p[len(prefix):]: m for p, m in full.items()}
    nb, bs = xs.shape[:2]
    weights = put((np.arange(nb * bs) < n).astype(np.float32).reshape(nb, bs))
    before = _scalar(self.mse(block, xs, ys, weights))
    if not any(jax.tree.leaves(mask)):
      return block, (before, before)
    stored, frozen = partition(block, mask)
    train = jax.tree.map(lambda a: a.astype(jnp.float32), stored)
    opt_state = self.opt.init(train)
    for s, idx in enumerate(self.cfg.windows(block_index, n)):
      train, opt_state, loss = self.step(train, opt_state, stored, frozen, xs, ys, put(idx))
      if on_step is not None:
        on_step(s, loss)
    tuned = combine(jax.tree.map(lambda m, s: m.astype(s.dtype), train, stored), frozen)
    after = _scalar(self.mse(tuned, xs, ys, weights))
    return tuned, (before, after)
