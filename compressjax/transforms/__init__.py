"""Compression transforms: ``Transform(init, update)`` pairs, chained and routed by rules."""

from compressjax.transforms.base import (DEFAULT_WHERE, PLANNING, ChainState, LeafwiseState, Rule, SelectState, Transform,
                                         UnmatchedRuleError, apply, chain, identity, leafwise, plan,
                                         select, to_abstract)
from compressjax.transforms.aqlm import aqlm
from compressjax.transforms.awq import awq
from compressjax.transforms.gptvq import gptvq
from compressjax.transforms.incoherence import incoherence
from compressjax.transforms.factorize import asvd, eora, lq_lora, svd
from compressjax.transforms.prune import StructuredState, magnitude, sparsegpt, structured, wanda
from compressjax.transforms.quantize import gptq, owq, rtn, spqr
from compressjax.transforms.lattice import e8p
from compressjax.transforms.selection import (LINEAR_KERNELS, Selector, as_predicate, is_leaf,
                                              leaves_with_paths, map_with_path, path_str)

__all__ = [
    "ChainState", "DEFAULT_WHERE", "PLANNING", "LeafwiseState", "LINEAR_KERNELS", "Rule", "SelectState", "Selector", "Transform",
    "UnmatchedRuleError", "apply", "as_predicate", "chain", "identity", "is_leaf", "leafwise",
    "leaves_with_paths", "map_with_path", "path_str", "plan", "awq", "gptq", "owq", "rtn", "select",
    "spqr", "to_abstract", "magnitude", "wanda", "sparsegpt", "structured", "StructuredState",
    "svd", "asvd", "eora", "lq_lora",
    "gptvq",
    "e8p",
    "aqlm",
    "incoherence",
]
