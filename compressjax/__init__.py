"""compressjax: composable, sharded compression of large language models in JAX/Flax.

Modules: :mod:`formats` (compressed leaves and the matmul dispatch point), :mod:`quantize`
(algorithm math), :mod:`transforms` (tree rewrites, rules, chains), :mod:`model` (Llama-family
NNX model), :mod:`io` (GGUF / Hugging Face loaders), :mod:`data`, :mod:`evaluate`,
:mod:`generate`, :mod:`checkpoint`, :mod:`pipeline` (the compress/eval jobs).
"""

from compressjax import formats
from compressjax import quantize
from compressjax import transforms

__version__ = "0.1.0"
__all__ = ["formats", "quantize", "transforms", "__version__"]
