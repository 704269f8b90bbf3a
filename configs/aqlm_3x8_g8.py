"""AQLM 3x8, groups of 8 inputs: three 256-entry codebooks per layer, 3 code bits per weight.

The ~3-bit setting of AQLM (the settings of ``aqlm_2x8_g8`` with a third codebook): each vector
of 8 consecutive inputs of one output is the sum of one codeword from each of three ``float16``
256 x 8 codebooks, times a ``float16`` per-output scale.

Honest bits per parameter on SmolLM2-135M: codes 3 * 8 / 8 = 3.000; codebooks
3 * 256 * 8 * 16 = 98304 bits per layer, 688,128 per block of 3,538,944 linear weights = 0.194;
scales 0.023: 3.22 bits per parameter (GPTVQ d2 3-bit: 3.17, incoherent GPTQ 3-bit g64: 3.25).

Solver time: the beam search scores each codebook in turn, so a round costs about 3/2 of
2x8's; the whole model about 1.5 x 2x8's 15 minutes of compression.

References:
  Egiazarian et al. 2024, AQLM (arXiv:2401.06118).
"""

from configs import aqlm_2x8_g8


def get_config():
  c = aqlm_2x8_g8.get_config()
  c.compression.name = "aqlm-3x8-g8"
  c.compression.kwargs.num_codebooks = 3
  c.output_dir = "runs/aqlm_3x8_g8"
  return c
