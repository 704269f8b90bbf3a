"""End-to-end knowledge distillation of a compressed checkpoint (``compressjax finetune``).

The student is a checkpoint written by ``compressjax compress`` (``checkpoint``), the teacher the
uncompressed model it came from (``model``). Only continuous parameters train: by default the
continuous children that each compressed format declares (scales, zeros, codebooks, factors) of
every compressed decoder linear, plus the RMSNorm scales; codes never change. Training and
held-out windows are drawn like the protocol's calibration windows (wiki after the evaluation
region + five Austen novels), never from the evaluation windows.

  compressjax finetune --config configs/finetune_kd.py --config.checkpoint=runs/gptq_w2g64
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  base = default.get_config()
  c = ml_collections.ConfigDict()
  # Name appended to the student's method name in tables and records.
  c.name = "kd"
  # Teacher: the uncompressed model (same reference as `compress` takes).
  c.model = base.model
  # Student: a directory written by `compressjax compress` (required).
  c.checkpoint = ""
  # Compute dtype of the dense parts.
  c.dtype = "float32"
  # Evaluation (the standard protocol).
  c.data = base.data
  c.calibration = ml_collections.ConfigDict()
  # Training windows (seeded draws from the calibration text, as the protocol's calibration).
  c.calibration.num_windows = 128
  # Extra windows drawn with them and held out: the KD loss is reported on them before/after.
  c.calibration.heldout_windows = 8
  c.calibration.seq_len = 512
  c.calibration.seed = 0
  # "mixed", "wiki", "austen" or a text file/dir (see configs/default.py).
  c.calibration.source = "mixed"
  c.finetune = ml_collections.ConfigDict()
  # "kd": continuous children only (codes fixed); "ste": straight-through latent weights
  # (configs/finetune_ste.py); "pv": PV-tuning (configs/finetune_pv.py).
  c.finetune.mode = "kd"
  # Optimizer steps; tokens seen = steps * micro_batch * accum * seq_len.
  c.finetune.steps = 64
  # Peak learning rate of Adam (warm-up then cosine to 10%).
  c.finetune.lr = 1e-4
  c.finetune.warmup = 4
  # Windows per forward/backward pass and passes accumulated per step.
  c.finetune.micro_batch = 1
  c.finetune.accum = 4
  # KD temperature and the weight of the added next-token loss (0: pure KD).
  c.finetune.temperature = 1.0
  c.finetune.lm_weight = 0.0
  # Loss positions per chunk (bounds the (chunk, vocab) logits temporaries).
  c.finetune.chunk = 256
  c.finetune.seed = 0
  c.finetune.checkpoint_every = 16
  # Parameters whose compressed leaves' continuous children train (regex on paths).
  c.finetune.train = r"layers/\d+/(attn|mlp)/\w+_proj/kernel"
  # Dense parameters that also train ("" for none): the RMSNorm scales by default.
  c.finetune.train_dense = r"(layers/\d+/\w+_norm|norm)/scale"
  # Where the tuned checkpoint is written ("" = not saved), and whether to replace one.
  c.output_dir = ""
  c.overwrite = False
  # Orbax CheckpointManager directory: a killed run resumes from here ("" = no resume).
  c.resume_dir = ""
  # JSON-lines results file ("" = not recorded).
  c.results_file = ""
  return c
