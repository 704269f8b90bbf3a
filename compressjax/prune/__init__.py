"""Pruning math on arrays (masks, SparseGPT, structured channel selection); no trees or configs.

The transforms that wire these into models live in :mod:`compressjax.transforms`.
"""

from compressjax.prune.masks import (global_threshold_masks, lamp_score, nm_mask, parse_pattern,
                                     unstructured_mask, wanda_score)
from compressjax.prune.sparsegpt_core import sparsegpt_prune, sparsegpt_reference

__all__ = ["global_threshold_masks", "lamp_score", "nm_mask", "parse_pattern",
           "sparsegpt_prune", "sparsegpt_reference", "unstructured_mask", "wanda_score"]
