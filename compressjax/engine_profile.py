"""Where the time of a calibration run goes: an opt-in phase profile of :func:`run_sequential`.

``calibration.run_sequential(..., profile=EngineProfile())`` fills the profile with the wall
seconds of each phase of the engine, per block and in total:

* ``read``: reading the block's dense parameters (:meth:`BlockModel.block_params`; from disk
  for a lazily loaded model) and, once, the parameters outside the blocks;
* ``transfer``: host <-> device placement (``_Placement.put*`` / ``local``);
* ``embed``: the embedding pass (once);
* ``stats``: the statistics pass (the block forward with captured inputs + the fused ``X^T X``);
* ``solver``: the transform's ``update`` (GPTQ, SparseGPT, ...);
* ``finetune``: the block fine-tune (``block_finetune``), if any;
* ``forward``: the propagation pass (the compressed block's outputs, ``mode="sequential"``);
* ``save``: the resume point (``resume_dir``); ``resume``: reading one back;
* ``outside``: the data-free update of the parameters outside the blocks and the final tree.

Each timed phase ends with :func:`jax.block_until_ready` on its outputs, so its seconds are its
own work and not the asynchronous tail of an earlier one; these syncs happen **only** when
profiling (the default path has none). XLA's tracing, lowering and compiling are measured
through :mod:`jax.monitoring` (the ``/jax/core/compile/*`` events: ``jaxpr_trace_duration``,
``jaxpr_to_mlir_module_duration``, ``backend_compile_duration``, whose time spans are merged so
nested traces are counted once) and attributed to the phase they happen in: ``compile_s[phase]``
is part of ``seconds[phase]``, and ``seconds - compile_s`` is the phase's compute (plus its
Python dispatch). The listener is registered for the call only.

FLOPs per phase: for the jitted passes (``embed``, ``stats``, ``forward``) XLA's cost analysis
(``flops``) of the same program lowered for **one** batch, multiplied by the number of batches
(XLA's cost analysis counts a ``scan``/``while`` body once, whatever its trip count; the passes'
inner micro-steps are multiplied in the same way). It is the
lowered program's :meth:`jax.stages.Lowered.cost_analysis` (no backend compile; on the tiny
test model within 0.3% of the compiled program's count), or the compiled one's where the
lowered one gives none. It is taken after the phase ran, once per program and shape (its time
is ``overhead_s``, outside every phase and never in ``compile_s``). For
the solver an analytic count, :func:`obs_solver_flops` per calibrated layer (what
:mod:`compressjax.quantize.obs_core` executes; GPTQ, SparseGPT, SpQR, OWQ); other phases are not
counted (``None``).

References:
  Frantar et al. 2022, GPTQ (Algorithm 1: Cholesky of ``H^{-1}``, lazy batch updates);
  Frantar & Alistarh 2023, SparseGPT (the same recursion with a pruning rule);
  JAX ``jax.monitoring`` (event listeners) and ``jax.stages.Compiled.cost_analysis``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np

__all__ = ["EngineProfile", "PHASES", "obs_solver_flops"]

PHASES = ("read", "transfer", "embed", "stats", "solver", "finetune", "forward", "save",
          "resume", "outside")
_COMPILE_PREFIX = "/jax/core/compile/"
_OVERHEAD = "_overhead"  # the profile's own work (cost analysis compiles): in no phase


def obs_solver_flops(k: int, n: int, blocksize: int = 128) -> float:
  """Floating-point operations of the OBS solver on one ``(K, N)`` layer (``(in, out)``).

  Counts what :mod:`compressjax.quantize.obs_core` executes (GPTQ, SparseGPT, SpQR, OWQ):

  * ``Hinv`` (:func:`~compressjax.quantize.obs_core.hinv_cholesky` through
    :func:`~compressjax.quantize.obs_core.hinv_factor`): one Cholesky of the reversed ``H``
    (``K^3 / 3``) and the triangular inverse of its factor (``K^3 / 3``): ``2 K^3 / 3`` (one
    damping attempt; the references' Cholesky + ``cholesky_inverse`` + second Cholesky, which
    this module executed before, is ``8 K^3 / 3``);
  * the recursion (:func:`~compressjax.quantize.obs_core.sweep`, ``B = min(blocksize, K)``):
    each row's rank-1 update of its block (``2 B N`` per row: ``2 K B N``) and after each block
    the lazy batch update ``Hinv[i1:i2, :]^T Err1`` over all ``K`` rows (``2 K B N`` per block:
    ``2 K^2 N``); GPTQ's group-grid refits read ``rows()`` (about another ``2 K B N``).

  Not counted: the rounding/pruning rule itself (``O(K N)``), permutations, dead-input fixes.
  Total: ``2 K^3 / 3 + 2 K^2 N + 4 K B N``. The useful work of the paper's algorithm is less
  (``K^3 / 3`` + ``K^2 N``); this is the executed count, which a speed-up may lower.

  Args:
    k: input features (rows of ``W``, the Hessian's size).
    n: output features (columns of ``W``).
    blocksize: the solver's lazy-batch block (128 in every recipe here).

  Returns:
    The FLOP count as a float.
  """
  b = min(blocksize, k)
  return 2.0 * k**3 / 3.0 + 2.0 * k * k * n + 4.0 * k * b * n


def _hwm_mb() -> float | None:
  """This process's resident-memory high-water mark (``VmHWM``, MiB); ``None`` off Linux."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    return None
  return None


def _reset_hwm() -> bool:
  """Resets ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5); False where that fails."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _union(spans: list[tuple[float, float]]) -> float:
  total, end = 0.0, -np.inf
  for s, e in sorted(spans):
    if e <= end:
      continue
    total += e - max(s, end)
    end = e
  return total


def _flops(cost) -> float | None:
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def _abstract(tree, batch_one: bool = False):
  def sds(a):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
      return a
    shape = tuple(a.shape)
    if batch_one:
      shape = (1,) + shape[1:]
    return jax.ShapeDtypeStruct(shape, a.dtype)

  return jax.tree.map(sds, tree)


@dataclasses.dataclass
class EngineProfile:
  """The phase profile of one :func:`compressjax.calibration.run_sequential` call.

  Pass a fresh one as ``profile=``; the engine fills it (module docstring for the phases). All
  seconds are wall seconds (:func:`time.perf_counter`).

  Attributes:
    solver_flops: ``(K, N) -> FLOPs`` of the solver on one calibrated layer
      (default :func:`obs_solver_flops`, right for GPTQ / SparseGPT / SpQR / OWQ); ``None``:
      the solver's FLOPs are not counted (e.g. AWQ, RTN, AQLM).
    blocks: one dict per block, ``{"block": i, "seconds": {phase: s}, "compile_s": {phase:
      s}, "flops": {phase: flops}}``.
    seconds: total seconds per phase (every phase of :data:`PHASES`, 0 when it did not run).
    compile_s: per phase, the seconds of XLA tracing + lowering + compilation inside it
      (overlapping spans merged); part of ``seconds``.
    compile_events: per ``jax.monitoring`` event name, the summed durations (nested traces each
      counted: the raw numbers behind ``compile_s``).
    flops: total FLOPs per phase, ``None`` for a phase that is not counted.
    wall_s: the whole call.
    overhead_s: the profile's own work (lowering the one-batch programs for the cost analysis), inside
      ``wall_s`` but in no phase.
    peak_rss_mb: per phase, the highest resident memory of the process (MiB) while that phase
      ran (also per block, as ``blocks[i]["peak_rss_mb"]``); ``None`` where the platform gives no
      per-phase peak. Measured with Linux's resettable high-water mark: before each phase
      ``/proc/self/clear_refs`` is written ``5`` (which resets ``VmHWM``) and after it
      ``VmHWM`` is read, so the kernel's own record of the process's peak is only per phase
      while profiling; ``peak_rss_total_mb`` keeps the maximum over the whole call (phases,
      the time between them and the peak before the call).
    peak_rss_total_mb: the process's peak resident memory up to the end of the call (MiB),
      ``None`` where the platform gives none.
  """

  solver_flops: Callable[[int, int], float] | None = obs_solver_flops
  blocks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)
  compile_s: dict[str, float] = dataclasses.field(default_factory=dict)
  compile_events: dict[str, float] = dataclasses.field(default_factory=dict)
  flops: dict[str, float | None] = dataclasses.field(default_factory=dict)
  wall_s: float = 0.0
  overhead_s: float = 0.0
  peak_rss_mb: dict[str, float | None] = dataclasses.field(default_factory=dict)
  peak_rss_total_mb: float | None = None

  def total_compile_s(self) -> float:
    """Seconds of tracing + lowering + compiling in all phases."""
    return float(sum(self.compile_s.values()))

  def summary(self, matmul_gflops: float | None = None) -> dict[str, dict[str, Any]]:
    """Per phase: ``s``, ``compile_s``, ``share`` (of ``wall_s``), ``gflop``, ``gflop_per_s``
    (over the phase's seconds), ``gflop_per_s_compute`` (over its seconds less its compile
    seconds), ``peak_rss_mb`` and, with ``matmul_gflops`` (a plain large matmul's rate on the same machine),
    ``fraction_of_matmul`` (of ``gflop_per_s_compute``). Uncounted values are ``None``."""
    out = {}
    for ph in PHASES:
      s, c, f = self.seconds.get(ph, 0.0), self.compile_s.get(ph, 0.0), self.flops.get(ph)
      rate = f / s / 1e9 if f is not None and s > 0 else None
      compute = s - c
      crate = f / compute / 1e9 if f is not None and compute > 0 else None
      out[ph] = {"s": s, "compile_s": c, "share": s / self.wall_s if self.wall_s else None,
                 "gflop": None if f is None else f / 1e9, "gflop_per_s": rate,
                 "gflop_per_s_compute": crate, "peak_rss_mb": self.peak_rss_mb.get(ph),
                 "fraction_of_matmul": (crate / matmul_gflops
                                        if crate is not None and matmul_gflops else None)}
    return out


class _NoProfile:
  """The default: every hook is a plain call (no syncs, no timers)."""

  solves_flops = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def run(self, phase, fn, *args, **kwargs):
    del phase
    return fn(*args, **kwargs)

  def block_start(self, i):
    pass

  def block_end(self):
    pass

  def pass_flops(self, phase, fn, args, batched, nb):
    pass

  def add_flops(self, phase, flops):
    pass


class _Recorder:
  """Fills an :class:`EngineProfile` while the engine runs (a context manager)."""

  def __init__(self, profile: EngineProfile):
    self.p = profile
    self.phase = None
    self.spans: list[tuple[str | None, str, float, float]] = []
    self.block: dict[str, Any] | None = None
    self._flops_cache: dict[Any, float | None] = {}

  @property
  def solves_flops(self) -> bool:
    return self.p.solver_flops is not None

  def solver_flops(self, k: int, n: int) -> float:
    return float(self.p.solver_flops(k, n))

  def _listen(self, event, start, end, **kwargs):
    del kwargs
    if event.startswith(_COMPILE_PREFIX):
      self.spans.append((self.phase, event, start, end))

  def __enter__(self):
    p = self.p
    p.blocks.clear()
    p.seconds = {ph: 0.0 for ph in PHASES}
    p.compile_s = {ph: 0.0 for ph in PHASES}
    p.flops = {ph: (0.0 if ph in ("embed", "stats", "forward") or
                    (ph == "solver" and p.solver_flops is not None) else None) for ph in PHASES}
    p.compile_events = {}
    p.overhead_s = 0.0
    p.peak_rss_mb = {ph: None for ph in PHASES}
    p.peak_rss_total_mb = _hwm_mb()
    self._rss = p.peak_rss_total_mb is not None
    jax.monitoring.register_event_time_span_listener(self._listen)
    self.t0 = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.p.wall_s = time.perf_counter() - self.t0
    self._fold_peak(_hwm_mb())
    jax.monitoring.unregister_event_time_span_listener(self._listen)
    by_phase: dict[str, list] = {}
    for ph, ev, s, e in self.spans:
      self.p.compile_events[ev] = self.p.compile_events.get(ev, 0.0) + (e - s)
      if ph is not None and ph != _OVERHEAD:
        by_phase.setdefault(ph, []).append((s, e))
    for ph, spans in by_phase.items():
      self.p.compile_s[ph] = _union(spans)
    for blk in self.p.blocks:
      spans = blk.pop("_spans")
      blk["compile_s"] = {ph: _union([(s, e) for q, _, s, e in self.spans[spans[0]:spans[1]]
                                      if q == ph]) for ph in blk["seconds"]}
    return False

  def _fold_peak(self, mb):
    if mb is not None and self.p.peak_rss_total_mb is not None:
      self.p.peak_rss_total_mb = max(self.p.peak_rss_total_mb, mb)

  def run(self, phase, fn, *args, **kwargs):
    self.phase = phase
    if self._rss:  # the peak so far (between phases) is kept, then the phase's own is measured
      self._fold_peak(_hwm_mb())
      self._rss = _reset_hwm()
    t0 = time.perf_counter()
    try:
      out = jax.block_until_ready(fn(*args, **kwargs))
    finally:
      dt = time.perf_counter() - t0
      self.phase = None
      self.p.seconds[phase] += dt
      peak = _hwm_mb() if self._rss else None
      if peak is not None:
        self._fold_peak(peak)
        self.p.peak_rss_mb[phase] = max(self.p.peak_rss_mb[phase] or 0.0, peak)
      if self.block is not None:
        self.block["seconds"][phase] = self.block["seconds"].get(phase, 0.0) + dt
        if peak is not None:
          bp = self.block["peak_rss_mb"]
          bp[phase] = max(bp.get(phase, 0.0), peak)
    return out

  def block_start(self, i):
    self.block = {"block": i, "seconds": {}, "flops": {}, "peak_rss_mb": {},
                  "_spans": [len(self.spans), None]}

  def block_end(self):
    self.block["_spans"][1] = len(self.spans)
    self.p.blocks.append(self.block)
    self.block = None

  def add_flops(self, phase, flops):
    if flops is None or self.p.flops.get(phase) is None:
      return
    self.p.flops[phase] += flops
    if self.block is not None:
      self.block["flops"][phase] = self.block["flops"].get(phase, 0.0) + flops

  def pass_flops(self, phase, fn, args, batched, nb):
    """Adds the FLOPs of the jitted ``fn(*args)`` (``args[j]`` for ``j`` in ``batched`` carry
    ``nb`` batches along axis 0): the one-batch program's cost analysis times ``nb``."""
    abstract = tuple(_abstract(a, batch_one=j in batched) for j, a in enumerate(args))
    key = (phase, id(fn), str(jax.tree.structure(abstract)),
           tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(abstract)
                 if isinstance(a, jax.ShapeDtypeStruct)))
    if key not in self._flops_cache:
      self.phase = _OVERHEAD
      t0 = time.perf_counter()
      try:
        lowered = fn.lower(*abstract)
        flops = _flops(lowered.cost_analysis())
        if flops is None:
          flops = _flops(lowered.compile().cost_analysis())
        self._flops_cache[key] = flops
      finally:
        self.p.overhead_s += time.perf_counter() - t0
        self.phase = None
    one = self._flops_cache[key]
    if one is None:  # this backend gives no cost analysis: the phase's FLOPs are unknown
      self.p.flops[phase] = None
      return
    self.add_flops(phase, one * nb)


def recorder(profile: EngineProfile | None):
  """The engine's hooks: a :class:`_Recorder` for ``profile``, or plain calls without one."""
  if profile is None:
    return _NoProfile()
  if not isinstance(profile, EngineProfile):
    raise ValueError(f"profile must be a compressjax.calibration.EngineProfile or None, got "
                     f"{type(profile).__name__}")
  if profile.solver_flops is not None and not callable(profile.solver_flops):
    raise ValueError("profile.solver_flops must be a callable (K, N) -> FLOPs or None, got "
                     f"{type(profile.solver_flops).__name__}")
  return _Recorder(profile)
