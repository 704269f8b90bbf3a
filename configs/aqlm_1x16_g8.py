"""AQLM 1x16, groups of 8 inputs: one 65536-entry codebook per layer (the paper's 1x16 setting).

Code bits are the same 2 per weight as 2x8, but each layer stores a 65536 x 8 ``float16``
codebook, 1 MiB = 8,388,608 bits. On SmolLM2-135M's small layers that costs 25.3 bits per
parameter on q/o (576x576), 75.9 on k/v (576x192) and 9.5 on gate/up/down: per block
(3,538,944 linear weights) 16.59 bits of codebook + 2 of codes + 0.02 of scales = 18.6 bits per
parameter, *more than the float16 weights* (7 MiB of codebooks per block against 6.75 MiB of
float16 kernels). It is here to measure the method, not as a compression of this model.

It is also slow on CPU: every code step scores 65536 candidates per column and the k-means
initialisation clusters ~10^5 vectors into 65536 centroids. Measured on one 576x1536 layer
(random correlated Hessian, CPU seconds of the process including compile, shared machine at
load 10-12): one Lloyd iteration plus the assignment 52 s (relative output error 0.0226: with
65536 centroids for 110,592 vectors the codebook nearly memorises the layer), one beam pass
75 s (0.0218), 8 CG iterations 0.7 s (0.0130). Both dominant costs scale with K * N * 2**16:
with the settings below (2 Lloyd iterations, so 3 assignment passes of ~26 s, and one round)
that layer takes ~155 s, a block (4.0x its weights) ~10 min and the 30 blocks ~5 hours, against
~23 minutes for 2x8.

References:
  Egiazarian et al. 2024, AQLM (arXiv:2401.06118).
"""

from configs import aqlm_2x8_g8


def get_config():
  c = aqlm_2x8_g8.get_config()
  c.compression.name = "aqlm-1x16-g8"
  c.compression.kwargs.num_codebooks = 1
  c.compression.kwargs.nbits = 16
  c.compression.kwargs.beam_size = 1
  c.compression.kwargs.iterations = 1
  c.compression.kwargs.kmeans_iters = 2
  c.output_dir = "runs/aqlm_1x16_g8"
  return c
