"""Low-rank factorization math on arrays (SVD, whitened SVD, EoRA, LQ-LoRA, rank allocation).

The transforms that wire these into models live in :mod:`compressjax.transforms`.
"""

from compressjax.factorize.lowrank_core import (allocate_ranks, eora_factors, factorize,
                                                lq_decompose, rank_for_fraction, spectrum,
                                                whitening)

__all__ = ["allocate_ranks", "eora_factors", "factorize", "lq_decompose", "rank_for_fraction",
           "spectrum", "whitening"]
