"""End-to-end fine-tuning of a compressed model by knowledge distillation, with optax.

The student is the compressed model, the teacher the uncompressed one. The loss is the KL divergence
from the teacher's next-token distribution to the student's (Hinton et al. 2015, with temperature
``T`` and the usual ``T^2`` factor), optionally plus ``lm_weight`` times the student's language-model
loss on the same tokens. Only the leaves that ``mask`` marks train (for compressed formats: their
continuous children, see ``CompressedArray.trainable``); everything else, and every integer child,
stays out of :func:`jax.grad` altogether.

Costs, stated once: the teacher's logits are computed **on the fly** (one extra forward pass of the
uncompressed model per micro-batch, about a third of a step), not cached to disk (128 windows x 512
tokens x 49152 float16 logits would be 6.4 GB). Neither model's ``(batch, seq, vocab)`` logits are
materialized: the loss is computed ``chunk`` positions at a time under :func:`jax.checkpoint`, so
the largest temporaries are two ``(chunk, vocab)`` float32 arrays in the forward and the backward.
Gradient accumulation runs inside the jitted step (a ``lax.scan`` over micro-batches), so one
step compiles once whatever the accumulation factor.

Resumable: with ``checkpoint_dir`` the trainable leaves, the optimizer state and the step are saved
by an orbax ``CheckpointManager`` every ``checkpoint_every`` steps; the micro-batches of step ``s``
are a function of ``(seed, s)`` only, so a run killed and resumed follows the same trajectory
(same losses) as an uninterrupted one.

References:
  Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531.
  Malinovskii et al., "PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM
  Compression", arXiv:2405.14852 (end-to-end KD of the continuous parameters as the P-step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

__all__ = ["DistillConfig", "Partition", "partition", "kd_chunked_loss", "make_loss_fn",
           "finetune", "heldout_loss",
           "make_train_step"]


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Knobs of :func:`finetune`.

  Attributes:
    steps: optimizer steps.
    lr: peak learning rate (linear warm-up over ``warmup`` steps, then cosine to 10%).
    micro_batch: windows per forward/backward pass.
    accum: micro-batches accumulated per optimizer step (tokens per step =
      ``micro_batch * accum * seq_len``).
    temperature: KD temperature ``T``.
    lm_weight: weight of the student's next-token cross-entropy added to the KD loss.
    chunk: positions per loss chunk (bounds the logits temporaries).
    warmup: warm-up steps.
    b1, b2: Adam moments (AQLM fine-tunes with ``b1 = 0.9, b2 = 0.95``).
    max_grad_norm: global gradient clipping (``None``: none).
    seed: the data order's seed.
    checkpoint_every: steps between checkpoints when a directory is given.
  """

  steps: int = 100
  lr: float = 1e-4
  micro_batch: int = 1
  accum: int = 4
  temperature: float = 1.0
  lm_weight: float = 0.0
  chunk: int = 256
  warmup: int = 5
  b1: float = 0.9
  b2: float = 0.95
  max_grad_norm: float | None = 1.0
  seed: int = 0
  checkpoint_every: int = 25

  def __post_init__(self):
    for name in ("steps", "micro_batch", "accum", "chunk", "checkpoint_every"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"DistillConfig.{name} must be a positive int, got {v!r}")
    if not isinstance(self.warmup, int) or self.warmup < 0:
      raise ValueError(f"DistillConfig.warmup must be an int >= 0, got {self.warmup!r}")
    for name in ("lr", "temperature"):
      v = getattr(self, name)
      if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
        raise ValueError(f"DistillConfig.{name} must be a finite float > 0, got {v!r}")
    if not (isinstance(self.lm_weight, (int, float)) and 0 <= self.lm_weight < float("inf")):
      raise ValueError(f"DistillConfig.lm_weight must be a finite float >= 0, got "
                       f"{self.lm_weight!r}")

  def optimizer(self) -> optax.GradientTransformation:
    """Adam with warm-up + cosine decay and optional clipping."""
    sched = optax.warmup_cosine_decay_schedule(0.0, self.lr, max(self.warmup, 1),
                                               max(self.steps, self.warmup + 1),
                                               end_value=0.1 * self.lr)
    parts = [optax.clip_by_global_norm(self.max_grad_norm)] if self.max_grad_norm else []
    parts.append(optax.adam(sched, b1=self.b1, b2=self.b2))
    return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class Partition:
  """A parameter tree split into trainable and frozen leaves (flattened, compressed leaves too).

  ``train`` is the list of trainable leaves (what :func:`jax.grad` and optax see); ``frozen``
  everything else, including every integer child. :meth:`combine` rebuilds the tree.
  """

  treedef: Any
  train_idx: tuple[int, ...]
  frozen_idx: tuple[int, ...]
  train_dtypes: tuple[Any, ...] = ()

  def split(self, params) -> tuple[list, list]:
    leaves = jax.tree_util.tree_leaves(params)
    return [leaves[i] for i in self.train_idx], [leaves[i] for i in self.frozen_idx]

  def master(self, train) -> list:
    """float32 master copies of the trainable leaves (optax state and updates in float32: Adam's
    second moment underflows in float16)."""
    return [jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32)) for x in train]

  def combine(self, train, frozen):
    """The tree, trainable leaves cast back to their stored dtypes (a differentiable cast)."""
    leaves = [None] * (len(self.train_idx) + len(self.frozen_idx))
    for i, x, dt in zip(self.train_idx, train, self.train_dtypes or [None] * len(train)):
      leaves[i] = x if dt is None else x.astype(dt)
    for i, x in zip(self.frozen_idx, frozen):
      leaves[i] = x
    return jax.tree_util.tree_unflatten(self.treedef, leaves)


def partition(params, mask) -> Partition:
  """The :class:`Partition` of ``params`` by ``mask`` (a pytree of bools whose leaves align with
  ``params``'s leaves, compressed leaves flattened; e.g. ``finetune.trainable_mask(params)``).

  Raises:
    ValueError: the mask's leaf count differs from the parameters', or it selects a leaf that is
      not floating point (codes, masks and indices never train), naming the leaf.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  flags = jax.tree_util.tree_leaves(mask)
  if len(flags) != len(leaves):
    raise ValueError(f"mask has {len(flags)} leaves but the parameters have {len(leaves)}; build it "
                     "with compressjax.finetune.trainable_mask(params)")
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  train = []
  for i, (flag, leaf) in enumerate(zip(flags, leaves)):
    if bool(flag):
      if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(f"mask selects {paths[i]} of dtype {leaf.dtype}: only floating-point "
                         "leaves can train (codes, masks and indices are discrete)")
      train.append(i)
  if not train:
    raise ValueError("mask selects no parameter to train")
  chosen = set(train)
  frozen = tuple(i for i in range(len(leaves)) if i not in chosen)
  return Partition(treedef, tuple(train), frozen, tuple(leaves[i].dtype for i in train))


def kd_chunked_loss(h_student, h_teacher, tokens, logits_s: Callable, logits_t: Callable, *,
                    temperature: float, lm_weight: float, chunk: int):
  """Mean per-position KD loss (and LM loss) over the next-token predictions of ``tokens``.

  ``h_*`` are final hidden states ``(B, T, d)``; ``logits_*`` map ``(n, d)`` to ``(n, vocab)``.
  Computed ``chunk`` positions at a time under :func:`jax.checkpoint` (module docstring).
  Returns ``(loss, (kd, lm))`` with ``kd = T^2 KL(p_teacher^T || p_student^T)`` averaged over
  positions and ``lm`` the student's mean next-token NLL.
  """
  b, t, d = h_student.shape
  hs = h_student[:, :-1].reshape(-1, d)
  ht = jax.lax.stop_gradient(h_teacher[:, :-1].reshape(-1, d))
  target = tokens[:, 1:].reshape(-1)
  n = hs.shape[0]
  chunk = max(1, min(chunk, n))
  pad = (-n) % chunk
  valid = jnp.pad(jnp.ones((n,), jnp.float32), (0, pad)).reshape(-1, chunk)
  hs = jnp.pad(hs, ((0, pad), (0, 0))).reshape(-1, chunk, d)
  ht = jnp.pad(ht, ((0, pad), (0, 0))).reshape(-1, chunk, d)
  target = jnp.pad(target, (0, pad)).reshape(-1, chunk)

  @jax.checkpoint
  def one(carry, args):
    hs_c, ht_c, tc, vc = args
    ls = logits_s(hs_c).astype(jnp.float32)
    lt = jax.lax.stop_gradient(logits_t(ht_c).astype(jnp.float32))
    logp_s = jax.nn.log_softmax(ls / temperature, axis=-1)
    logp_t = jax.nn.log_softmax(lt / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1) * temperature**2
    nll = jax.nn.logsumexp(ls, axis=-1) - jnp.take_along_axis(ls, tc[:, None], axis=-1)[:, 0]
    kd_sum, lm_sum = carry
    return (kd_sum + jnp.sum(kl * vc), lm_sum + jnp.sum(nll * vc)), None

  zero = jnp.zeros((), jnp.float32)
  (kd, lm), _ = jax.lax.scan(one, (zero, zero), (hs, ht, target, valid))
  kd, lm = kd / n, lm / n
  return kd + lm_weight * lm, (kd, lm)


def make_loss_fn(cfg, part: Partition, teacher_params, dcfg: DistillConfig, dtype=jnp.float32):
  """``(loss_fn, teacher_state)``: ``loss_fn(train, frozen, teacher_state, tokens) -> (loss, (kd,
  lm))`` of the student rebuilt from its parts (:meth:`Partition.combine`) against the teacher
  built once from ``teacher_params`` (its ``nnx`` state is passed in, not closed over, so it is
  an argument of the compiled step rather than a constant baked into it)."""
  from compressjax.io import build_model  # pylint: disable=g-import-not-at-top

  teacher = build_model(cfg, teacher_params, dtype)

  def loss(train, frozen, teacher_state, tokens):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    student = build_model(cfg, part.combine(train, frozen), dtype)
    t_model = nnx.merge(teacher_graph, teacher_state)
    h_s, _ = student.hidden_states(tokens)
    h_t, _ = t_model.hidden_states(tokens)
    return kd_chunked_loss(h_s, h_t, tokens, student.logits, t_model.logits,
                           temperature=dcfg.temperature, lm_weight=dcfg.lm_weight,
                           chunk=dcfg.chunk)

  from flax import nnx  # pylint: disable=g-import-not-at-top
  teacher_graph, teacher_state = nnx.split(teacher)
  return loss, teacher_state


def make_train_step(loss_fn, opt: optax.GradientTransformation):
  """The jitted optimizer step ``(train, frozen, opt_state, teacher_state, batch) -> (train,
  opt_state, metrics)``; ``batch`` is ``(accum, micro_batch, seq_len)`` tokens, accumulated by a
  ``lax.scan`` inside the one compiled program."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  @jax.jit
  def step_fn(train, frozen, opt_state, teacher_state, batch):
    def micro(carry, tokens):
      g_acc, l_acc, kd_acc, lm_acc = carry
      (l, (kd, lm)), g = grad_fn(train, frozen, teacher_state, tokens)
      g_acc = jax.tree.map(jnp.add, g_acc, g)
      return (g_acc, l_acc + l, kd_acc + kd, lm_acc + lm), None

    zero = jnp.zeros((), jnp.float32)
    g0 = jax.tree.map(jnp.zeros_like, train)
    (g, l, kd, lm), _ = jax.lax.scan(micro, (g0, zero, zero, zero), batch)
    a = batch.shape[0]
    g = jax.tree.map(lambda x: x / a, g)
    updates, opt_state = opt.update(g, opt_state, train)
    train = optax.apply_updates(train, updates)
    return train, opt_state, {"loss": l / a, "kd": kd / a, "lm": lm / a}

  return step_fn


def _step_batches(n_windows: int, step: int, dcfg: DistillConfig) -> np.ndarray:
  """Window indices ``(accum, micro_batch)`` of ``step``: a function of ``(seed, step)`` only."""
  need = dcfg.accum * dcfg.micro_batch
  rng = np.random.default_rng([dcfg.seed, step])
  return rng.choice(n_windows, size=need, replace=need > n_windows).reshape(
      dcfg.accum, dcfg.micro_batch)


def heldout_loss(loss_fn, teacher_state, train, frozen, windows: np.ndarray,
                 micro_batch: int = 1) -> dict[str, float]:
  """Mean KD and LM loss of the student on ``windows`` (no gradients)."""
  f = jax.jit(lambda tr, fr, ts, tok: loss_fn(tr, fr, ts, tok)[1])
  kd = lm = 0.0
  n = 0
  for i in range(0, len(windows) - micro_batch + 1, micro_batch):
    k, l = f(train, frozen, teacher_state, jnp.asarray(windows[i:i + micro_batch]))
    kd += float(k)
    lm += float(l)
    n += 1
  return {"kd": kd / max(n, 1), "lm": lm / max(n, 1)}


def finetune(cfg, teacher_params, student_params, mask, windows: np.ndarray,
             dcfg: DistillConfig, *, checkpoint_dir: str | None = None,
             heldout: np.ndarray | None = None, progress: bool = True,
             log_file: str | None = None, dtype=jnp.float32,
             stop_after: int | None = None, opt: optax.GradientTransformation | None = None,
             post_step: Callable[[Partition], Callable] | None = None
             ) -> tuple[Any, list[dict[str, Any]]]:
  """Fine-tunes ``student_params`` (compressed) towards ``teacher_params`` (dense) by KD.

  Args:
    cfg: the model's :class:`~compressjax.model.LlamaConfig`.
    teacher_params, student_params: nested parameter dicts (``io.model_params``).
    mask: which leaves train (see :func:`partition`).
    windows: int ``(n, seq_len)`` training windows (calibration text, never evaluation windows).
    dcfg: :class:`DistillConfig`.
    checkpoint_dir: absolute or relative directory for the orbax ``CheckpointManager``; a run
      finding checkpoints there resumes from the newest.
    heldout: optional windows on which the KD loss is reported before and after.
    log_file: JSON-lines loss log (one record per step), appended.
    stop_after: stop (after checkpointing) once this step is reached; for kill/resume tests.
    opt: the optimizer (default ``dcfg.optimizer()``; PV-tuning passes one with a V-part).
    post_step: ``post_step(partition)`` returns a jitted ``(train, frozen) -> (train, frozen,
      info)`` run after every optimizer step (PV-tuning's V-step, which rewrites codes in
      ``frozen``); ``info``'s scalars join the step's record. With it the checkpoints hold
      ``frozen`` too.

  Returns:
    ``(params, history)``: the tuned tree and one dict per step run here (``step``, ``loss``,
    ``kd``, ``lm``, ``tokens``, ``step_s``).
  """
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2 or windows.shape[1] < 2:
    raise ValueError(f"finetune: windows must be (n, seq_len >= 2), got {windows.shape}")
  part = partition(student_params, mask)
  train, frozen = part.split(student_params)
  train = part.master(train)
  loss_fn, teacher_state = make_loss_fn(cfg, part, teacher_params, dcfg, dtype)
  opt = dcfg.optimizer() if opt is None else opt
  opt_state = opt.init(train)
  post = post_step(part) if post_step is not None else None
  start = 0

  mngr = None
  if checkpoint_dir:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    mngr = ocp.CheckpointManager(os.path.abspath(checkpoint_dir),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2))
    latest = mngr.latest_step()
    if latest is not None:
      target = {"train": train, "opt_state": opt_state}
      if post is not None:
        target["frozen"] = frozen
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
      restored = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
      train, opt_state = list(restored["train"]), restored["opt_state"]
      if post is not None:
        frozen = list(restored["frozen"])
      start = latest

  step_fn = make_train_step(loss_fn, opt)

  history = []
  tokens_per_step = dcfg.accum * dcfg.micro_batch * windows.shape[1]
  end = dcfg.steps if stop_after is None else min(dcfg.steps, stop_after)
  bar = tqdm(range(start, end), desc="finetune", disable=not progress, unit="step")
  for s in bar:
    idx = _step_batches(len(windows), s, dcfg)
    t0 = time.perf_counter()
    train, opt_state, m = step_fn(train, frozen, opt_state, teacher_state,
                                  jnp.asarray(windows[idx]))
    if post is not None:
      train, frozen, info = post(train, frozen)
      m = {**m, **info}
    m = {k: float(v) for k, v in m.items()}
    rec = {"step": s + 1, **m, "tokens": (s + 1) * tokens_per_step,
           "step_s": time.perf_counter() - t0}
    history.append(rec)
    if not np.isfinite(m["loss"]):
      raise FloatingPointError(f"finetune: loss is not finite at step {s + 1} ({m}); lower lr")
    bar.set_postfix(loss=f"{m['loss']:.4f}")
    if log_file:
      with open(log_file, "a") as f:
        f.write(json.dumps(rec) + "\n")
    if mngr is not None and ((s + 1) % dcfg.checkpoint_every == 0 or s + 1 == end):
      import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
      item = {"train": train, "opt_state": opt_state}
      if post is not None:
        item["frozen"] = frozen
      mngr.save(s + 1, args=ocp.args.StandardSave(item))
      mngr.wait_until_finished()
  if mngr is not None:
    mngr.close()
  return part.combine(train, frozen), history
