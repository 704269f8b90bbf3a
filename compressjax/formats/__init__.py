"""Compressed weight formats and the single matmul dispatch point.

Every compressed leaf subclasses :class:`CompressedArray` (a registered pytree
dataclass: arrays are children, metadata is static). Every product with a
weight goes through :func:`dot`, which multiplies dense arrays directly and
dispatches compressed leaves to the registered implementations of their
format (``"xla"`` pure-jnp is always available).

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from compressjax import formats
  >>> codes = jnp.zeros((64, 8), jnp.uint8)
  >>> w = formats.QuantizedArray.from_codes(
  ...     codes, jnp.ones((2, 8), jnp.float16), jnp.zeros((2, 8), jnp.float16),
  ...     bits=4, group_size=32, symmetric=False)
  >>> formats.dot(jnp.ones((3, 64)), w).shape
  (3, 8)
"""

from compressjax.formats.base import CompressedArray
from compressjax.formats.base import accumulation_dtype
from compressjax.formats.base import array_nbytes
from compressjax.formats.base import is_compressed
from compressjax.formats.base import tree_nbytes
from compressjax.formats.composite import KeptRows
from compressjax.formats.composite import SparseOutliers
from compressjax.formats.composite import SumArray
from compressjax.formats.composite import Transposed
from compressjax.formats.dispatch import FALLBACK_PRIORITY
from compressjax.formats.dispatch import MatmulImpl
from compressjax.formats.dispatch import dot
from compressjax.formats.dispatch import implementations
from compressjax.formats.dispatch import materialize
from compressjax.formats.dispatch import quantized_matmul_xla
from compressjax.formats.dispatch import register_matmul
from compressjax.formats.dispatch import unregister_matmul
from compressjax.formats.packing import pack
from compressjax.formats.packing import packed_length
from compressjax.formats.packing import packed_nbytes
from compressjax.formats.packing import unpack
from compressjax.formats.quantized import QUANTIZED_BITS
from compressjax.formats.quantized import QuantizedArray
from compressjax.formats.quantized import dequantize
from compressjax.formats.quantized import valid_group_sizes
from compressjax.formats.lowrank import LowRank
from compressjax.formats.additive import AdditiveCodebookArray
from compressjax.formats.sparse import BitmaskSparse
from compressjax.formats.sparse import NMSparse
from compressjax.formats.sparse import index_bits
from compressjax.formats.sharding import partition_specs
from compressjax.formats.vq import VQArray
from compressjax.formats.sharding import tree_shardings
from compressjax.formats.e8p import E8PArray  # after the others: it imports quantize.e8p_core
from compressjax.formats.e8p import E81BArray
from compressjax.formats.e8p import e8p_rvq
from compressjax.formats.incoherent import Incoherent  # after the others: it imports quantize

__all__ = [
    "partition_specs",
    "AdditiveCodebookArray",
    "tree_shardings",
    "FALLBACK_PRIORITY",
    "Incoherent",
    "QUANTIZED_BITS",
    "BitmaskSparse",
    "E8PArray",
    "E81BArray",
    "e8p_rvq",
    "CompressedArray",
    "KeptRows",
    "LowRank",
    "NMSparse",
    "SparseOutliers",
    "SumArray",
    "Transposed",
    "MatmulImpl",
    "QuantizedArray",
    "accumulation_dtype",
    "array_nbytes",
    "dequantize",
    "dot",
    "implementations",
    "index_bits",
    "is_compressed",
    "materialize",
    "pack",
    "packed_length",
    "packed_nbytes",
    "quantized_matmul_xla",
    "register_matmul",
    "unregister_matmul",
    "tree_nbytes",
    "unpack",
    "valid_group_sizes",
    "VQArray",
]

import pallas_kernels  # noqa: E402,F401  registers the "pallas" / "pallas_interpret" matmuls
import compressjax.kernels.cpu  # noqa: E402,F401  registers the "cpu" matmul (C++ FFI kernel)
