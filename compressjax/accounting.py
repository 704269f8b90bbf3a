"""Honest size accounting: bytes really stored per parameter, compressed part and the rest."""

from __future__ import annotations

from typing import Any

import numpy as np

from compressjax.formats import CompressedArray, array_nbytes
from compressjax.transforms.selection import LINEAR_KERNELS, Selector, as_predicate, leaves_with_paths

__all__ = ["size_report"]


def _nparams(leaf) -> int:
  return int(leaf.num_params) if isinstance(leaf, CompressedArray) else int(np.prod(leaf.shape))


def _nbytes(leaf) -> int:
  return int(leaf.nbytes) if isinstance(leaf, CompressedArray) else array_nbytes(leaf)


def size_report(params: Any, linear: Selector = LINEAR_KERNELS) -> dict[str, Any]:
  """Bytes and bits per parameter of the linear layers (the compressible part) and of the rest.

  ``linear_bits_per_param`` counts every stored byte of the selected layers (codes, scales, zeros,
  codebooks, indices, outliers, factors) over their original parameter count; embeddings, norms
  and (tied) heads are reported separately as ``other_*``.
  """
  pred = as_predicate(linear)
  lin_p = lin_b = oth_p = oth_b = n_comp = 0
  for path, leaf in leaves_with_paths(params):
    if pred(path, leaf):
      lin_p += _nparams(leaf)
      lin_b += _nbytes(leaf)
      n_comp += isinstance(leaf, CompressedArray)
    else:
      oth_p += _nparams(leaf)
      oth_b += _nbytes(leaf)
  return {
      "linear_params": lin_p,
      "linear_bytes": lin_b,
      "linear_bits_per_param": 8 * lin_b / lin_p if lin_p else float("nan"),
      "compressed_leaves": n_comp,
      "other_params": oth_p,
      "other_bytes": oth_b,
      "total_params": lin_p + oth_p,
      "total_bytes": lin_b + oth_b,
      "total_bits_per_param": 8 * (lin_b + oth_b) / (lin_p + oth_p) if lin_p + oth_p else float("nan"),
  }
