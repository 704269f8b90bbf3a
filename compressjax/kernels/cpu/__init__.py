"""C++ CPU kernels for compressed weights, as XLA FFI custom calls built at first use.

* :func:`quant_gemv`: float32 activations (1 to :data:`MAX_ROWS` rows) times a packed 2/3/4/8-bit
  :class:`~compressjax.formats.QuantizedArray`, decoded in SIMD registers.

Importing this package (``compressjax.formats`` does) registers the ``"cpu"`` implementation of
:func:`compressjax.formats.dot` for ``QuantizedArray``: tried first on the CPU backend for
decode-sized inputs, the XLA path otherwise. Turn it off per call
(``formats.dot(x, w, implementation="xla")``), per model
(``LlamaConfig(matmul_implementation="xla")``) or per process (``COMPRESSJAX_CPU_KERNEL=0``).
Nothing is compiled until the first product that uses it (:mod:`.builder`).
"""

from compressjax.kernels.cpu.builder import CpuKernelBuildError
from compressjax.kernels.cpu.builder import build
from compressjax.kernels.cpu.builder import enabled
from compressjax.kernels.cpu.builder import load
from compressjax.kernels.cpu.quant_gemv import DEFAULT_THREADS
from compressjax.kernels.cpu.quant_gemv import MAX_ROWS
from compressjax.kernels.cpu.quant_gemv import can_use
from compressjax.kernels.cpu.quant_gemv import cpu_matmul
from compressjax.kernels.cpu.quant_gemv import default_threads
from compressjax.kernels.cpu.quant_gemv import quant_gemv
from compressjax.kernels.cpu.quant_gemv import register
from compressjax.kernels.cpu.quant_gemv import supports

__all__ = [
    "CpuKernelBuildError",
    "DEFAULT_THREADS",
    "MAX_ROWS",
    "build",
    "can_use",
    "cpu_matmul",
    "default_threads",
    "enabled",
    "load",
    "quant_gemv",
    "register",
    "supports",
]

register()
