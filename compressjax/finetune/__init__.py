"""Fine-tuning compressed models: what may train (masks over parameter trees) and block-wise
fine-tuning in the calibration engine.

* :func:`trainable_mask` / :func:`partition` / :func:`combine`: the continuous children of
  compressed leaves (declared by each format's ``trainable``) and selected dense leaves;
* :class:`BlockFinetune`: the option of :func:`compressjax.calibration.run_sequential` that tunes
  each compressed block to the uncompressed block's outputs (AQLM's recipe).
"""

from compressjax.finetune.block import BlockFinetune
from compressjax.finetune.block import BlockTuner
from compressjax.finetune.masks import NORMS
from compressjax.finetune.masks import combine
from compressjax.finetune.masks import leaf_mask
from compressjax.finetune.masks import partition
from compressjax.finetune.masks import trainable_mask

__all__ = ["BlockFinetune", "BlockTuner", "NORMS", "combine", "leaf_mask", "partition",
           "trainable_mask"]
