"""RTN 4-bit g64 on every decoder linear and on an untied 4-bit g64 LM head (issue 16).

The tied head ``h @ E.T`` reads the whole float32 embedding per decoded token; with
``untie_head`` the model gets its own head ``lm_head/kernel = E.T`` (the embedding lookup stays
dense and exact) and the same RTN grid compresses it (see :mod:`compressjax.head`).
"""

from configs import rtn_w4g64


def get_config():
  c = rtn_w4g64.get_config()
  c.compression.name = "rtn-w4g64-qhead4"
  # Give the tied model its own LM head (lm_head/kernel = E.T, tie_word_embeddings=False) before
  # the recipe runs, so `where` can select it; the saved model config is the untied one.
  c.compression.untie_head = True
  # The decoder linears and the new head.
  c.compression.where = r"layers/\d+/(attn|mlp)/\w+_proj/kernel|lm_head/kernel"
  c.output_dir = "runs/rtn_w4g64_qhead4"
  return c
