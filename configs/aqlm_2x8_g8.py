"""AQLM 2x8, groups of 8 inputs: two 256-entry codebooks per layer, 2 code bits per weight.

Every decoder linear kernel becomes an :class:`~compressjax.formats.AdditiveCodebookArray`:
each vector of 8 consecutive inputs of one output is the sum of one codeword from each of two
learned ``float16`` codebooks of 256 x 8, times a ``float16`` per-output scale, fitted to the
layer's calibration Hessian (residual k-means, then rounds of beam search, least-squares
codebooks and closed-form scales).

Honest bits per parameter on SmolLM2-135M: codes 2 * 8 / 8 = 2.000; codebooks
2 * 256 * 8 * 16 = 65536 bits per layer (0.198 on q/o 576x576, 0.593 on k/v 576x192, 0.074 on
gate/up/down 576x1536); scales 16 bits per output (16 / K: 0.028, or 0.010 on down). Per block
(3,538,944 linear weights, 7 layers): 2 + 0.130 + 0.023 = 2.153 bits per parameter.

Solver time: measured per layer (jitted, after compile) with a random correlated Hessian, as CPU
seconds of the process (the 2-core machine was shared, load average 8-11, so wall times were 2-4x
larger); relative output error ||X dW||^2 / ||X W||^2 on 576x1536 / 1536x576; whole model =
30 blocks of q, k, v, o, gate, up, down:

  k-means only (10 Lloyd iterations)   0.103 / 0.103
  beam 1, 4 rounds    3.8 s / 4.9 s   0.0730 / 0.0593   8.2 min
  beam 1, 8 rounds    5.6 s / 8.4 s   0.0720 / 0.0575  12.5 min
  beam 2, 8 rounds   10.6 s / 15.2 s  0.0711 / 0.0567  22.6 min   <- these settings

(6 k-means iterations, 8 CG iterations per codebook update). The chosen settings fit the
~40-minute solver budget for the whole model on an otherwise idle 2-core CPU.

References:
  Egiazarian et al. 2024, AQLM (arXiv:2401.06118).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.compression.name = "aqlm-2x8-g8"
  c.compression.method = "aqlm"
  # M: codewords summed per vector.
  c.compression.kwargs.num_codebooks = 2
  # B: bits per code (2**B codewords per codebook).
  c.compression.kwargs.nbits = 8
  # g: consecutive inputs per vector.
  c.compression.kwargs.in_group_size = 8
  # Hypotheses per output column in the code search.
  c.compression.kwargs.beam_size = 2
  # Rounds of (beam search, codebook least squares, scales) after the k-means initialisation.
  c.compression.kwargs.iterations = 8
  # Lloyd iterations per codebook of the residual k-means initialisation.
  c.compression.kwargs.kmeans_iters = 6
  # Conjugate-gradient iterations per codebook update.
  c.compression.kwargs.cg_iters = 8
  c.output_dir = "runs/aqlm_2x8_g8"
  return c
