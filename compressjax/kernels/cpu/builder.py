"""Builds, caches and loads the C++ CPU kernels (XLA FFI custom calls) at first use.

The source (``quant_gemv.cc``, shipped in the package) is compiled with the system C++ compiler
against the XLA FFI headers of the installed jaxlib (:func:`jax.ffi.include_dir`), with
``-O3 -march=native`` since it is built on the machine that runs it. The shared object is cached
in a per-user directory under a name keyed by the source hash, the jax/jaxlib versions, the
compiler command and flags, and the CPU's feature flags, so a changed source, jax upgrade or
different CPU builds a new one; it is written to a temporary sibling and renamed into place
(atomic: concurrent builders never load a half-written file). The library is loaded with
:mod:`ctypes` and its handlers registered with :func:`jax.ffi.register_ffi_target` for the
``cpu`` platform, once per process.

Environment:

* ``COMPRESSJAX_CPU_KERNEL=0`` disables the kernels (``formats.dot`` then uses the XLA path and
  nothing is compiled);
* ``COMPRESSJAX_CXX``: the compiler command (default ``g++``);
* ``COMPRESSJAX_CACHE_DIR``: cache root (default ``$XDG_CACHE_HOME/compressjax`` or
  ``~/.cache/compressjax``); libraries go to its ``cpu_kernels/`` folder.

References:
  JAX, "Foreign function interface (FFI)" (``jax.ffi.ffi_call``, ``register_ffi_target``,
  ``XLA_FFI_DEFINE_HANDLER_SYMBOL``), https://docs.jax.dev/en/latest/ffi.html.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jaxlib

__all__ = [
    "CpuKernelBuildError",
    "DEFAULT_FLAGS",
    "SOURCE",
    "build",
    "cache_dir",
    "compiler",
    "enabled",
    "load",
]

#: The kernel source shipped with the package.
SOURCE = Path(__file__).with_name("quant_gemv.cc")

#: Compiler flags (the include directory and output are added).
DEFAULT_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")

#: FFI handler symbols of the library and the target names they are registered under.
HANDLERS = ("cj_quant_gemv_sym", "cj_quant_gemv_asym")


class CpuKernelBuildError(RuntimeError):
  """The CPU kernel library could not be compiled or loaded (the message holds the compiler
  command and its output)."""


def enabled() -> bool:
  """``False`` when ``COMPRESSJAX_CPU_KERNEL`` is ``0``/``false``/``off`` (default: enabled)."""
  return os.environ.get("COMPRESSJAX_CPU_KERNEL", "1").strip().lower() not in ("0", "false",
                                                                                 "off", "no")


def compiler() -> str:
  """The compiler command: ``$COMPRESSJAX_CXX`` or ``g++``."""
  return os.environ.get("COMPRESSJAX_CXX", "g++")


def cache_dir() -> Path:
  """``$COMPRESSJAX_CACHE_DIR/cpu_kernels`` (default root ``$XDG_CACHE_HOME/compressjax`` or
  ``~/.cache/compressjax``)."""
  root = os.environ.get("COMPRESSJAX_CACHE_DIR")
  if not root:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.join(xdg, "compressjax")
  return Path(root) / "cpu_kernels"


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return f"{platform.machine()} {platform.processor()}"


def _key(cxx: str, flags: tuple[str, ...]) -> str:
  h = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jax.__version__.encode(), jaxlib.__version__.encode(),
               cxx.encode(), " ".join(flags).encode(), _cpu_flags().encode()):
    h.update(part)
    h.update(b"\0")
  return h.hexdigest()[:20]


def build(*, cxx: str | None = None, flags: tuple[str, ...] | None = None,
          directory: str | os.PathLike | None = None) -> Path:
  """Compiles :data:`SOURCE` into the cache (if not already there) and returns the library path.

  Args:
    cxx: compiler command (split like a shell word list); default :func:`compiler`.
    flags: compiler flags; default :data:`DEFAULT_FLAGS`.
    directory: cache folder; default :func:`cache_dir`.

  Returns:
    Path of the cached shared object.

  Raises:
    CpuKernelBuildError: the compiler is missing or failed; the message names the full command,
      its exit status and its stderr.
  """
  cxx = compiler() if cxx is None else cxx
  flags = DEFAULT_FLAGS if flags is None else tuple(flags)
  directory = Path(directory) if directory is not None else cache_dir()
  out = directory / f"quant_gemv-{_key(cxx, flags)}.so"
  if out.exists():
    return out
  try:
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=directory)
  except OSError as e:
    raise CpuKernelBuildError(
        f"cannot write the compressjax CPU kernel's cache directory {str(directory)!r}: {e}. "
        "Set COMPRESSJAX_CACHE_DIR to a writable folder, or COMPRESSJAX_CPU_KERNEL=0 to use the "
        "XLA path.") from e
  os.close(fd)
  cmd = shlex.split(cxx) + list(flags) + ["-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
  try:
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
      raise CpuKernelBuildError(
          f"could not run the C++ compiler for the compressjax CPU kernel: {shlex.join(cmd)!r}: "
          f"{e}. Install g++ (or set COMPRESSJAX_CXX), or set COMPRESSJAX_CPU_KERNEL=0 to use "
          f"the XLA path.") from e
    if proc.returncode != 0:
      raise CpuKernelBuildError(
          f"building the compressjax CPU kernel failed (exit status {proc.returncode}).\n"
          f"command: {shlex.join(cmd)}\nstderr:\n{proc.stderr[-4000:]}\n"
          f"Set COMPRESSJAX_CXX to another compiler, or COMPRESSJAX_CPU_KERNEL=0 to use the XLA "
          f"path.")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


_LOCK = threading.Lock()
_LOADED: dict[str, "Library"] = {}


class Library:
  """A loaded kernel library and the FFI target names its handlers are registered under."""

  def __init__(self, path: Path, suffix: str):
    self.path = path
    self.lib = ctypes.cdll.LoadLibrary(str(path))
    self.targets = {}
    for sym in HANDLERS:
      name = f"compressjax_{sym}{suffix}"
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(self.lib, sym)),
                                  platform="cpu")
      self.targets[sym.rsplit("_", 1)[-1]] = name  # "sym" / "asym"
    self.simd = bool(self.lib.cj_quant_gemv_simd())


def load(*, variant: str = "native") -> Library:
  """Builds (if needed), loads and registers the kernel library once per process.

  Args:
    variant: ``"native"`` (:data:`DEFAULT_FLAGS`: AVX2/FMA where the CPU has them) or
      ``"scalar"`` (the portable loop, ``-mno-avx2 -mno-fma``; for tests).

  Raises:
    CpuKernelBuildError: see :func:`build`.
  """
  with _LOCK:
    if variant not in _LOADED:
      if variant == "native":
        flags, suffix = DEFAULT_FLAGS, ""
      elif variant == "scalar":
        flags = tuple(f for f in DEFAULT_FLAGS if f != "-march=native") + ("-mno-avx2",
                                                                             "-mno-fma")
        suffix = "_scalar"
      else:
        raise ValueError(f"variant must be 'native' or 'scalar', got variant={variant!r}.")
      path = build(flags=flags)
      try:
        _LOADED[variant] = Library(path, suffix)
      except OSError as e:
        raise CpuKernelBuildError(f"could not load the CPU kernel library {path}: {e}") from e
    return _LOADED[variant]
