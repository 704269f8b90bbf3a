"""The XLA products of every format never build a dense-size temporary (issue 16, item 1).

For each format, ``formats.dot`` is compiled with ``jax.jit(...).lower(...).compile()`` and its
``memory_analysis().temp_size_in_bytes`` must stay below the dense weight's bytes in the
activation dtype, at decode shapes (1 and 16 rows) and a prefill shape (512 rows). The weight is
``4096 x 512`` so that the ``(M, N)`` float32 accumulator of 512 rows (1 MB, an output-sized
buffer every product needs) is well below the dense weight (8 MB): the test measures the weight
temporaries, not the output. A second test checks the products against ``x @ materialize()``
with a ragged ``K`` (a remainder tile) at the same row counts.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from compressjax import formats
from compressjax.formats import tiled

K, N = 4096, 512
ROWS = (1, 16, 512)


def _leaves(k, n, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((k, n)).astype(np.float32)
  f16 = lambda *s: jnp.asarray(rng.random(s).astype(np.float16) + 0.5)
  q = lambda bits, g, sym=True, rows=k: formats.QuantizedArray.from_codes(
      jnp.asarray(rng.integers(0, 2**bits, (rows, n))), f16(rows // g, n),
      None if sym else f16(rows // g, n), bits=bits, group_size=g, symmetric=sym)
  keep = rng.random((k, n)) < 0.5
  nm_keep = np.zeros((k, n), bool)
  nm_keep[0::4] = True
  nm_keep[3::4] = True
  nm = formats.NMSparse.from_dense(w, nm_keep, n=2, m=4)
  outl = np.where(rng.random((k, n)) < 0.01, w, 0).astype(np.float32)
  so = formats.SparseOutliers.from_dense(outl)
  kr = formats.KeptRows(jnp.array([3, k // 2], jnp.int32), f16(2, n), shape=(k, n),
                        dtype=jnp.float32)
  lr = formats.LowRank(jnp.asarray(w[:, :8]), jnp.asarray(w[:8]), dtype=jnp.float32)
  qt = formats.QuantizedArray.from_codes(jnp.asarray(rng.integers(0, 16, (n, k))),
                                         f16(n // 32, k), None, bits=4, group_size=32,
                                         symmetric=True)
  cb = lambda *s: jnp.asarray(rng.integers(-100, 100, s).astype(np.int8))
  return {
      "quantized4_g64": q(4, 64),
      "quantized3_g32_asym": q(3, 32, sym=False),
      "quantized2_perchannel": q(2, k),
      "quantized8_g128": q(8, 128),
      "bitmask_float": formats.BitmaskSparse.from_dense(w, keep),
      "bitmask_q4": formats.BitmaskSparse.from_codes(
          rng.integers(0, 16, (k, n)), keep, f16(k // 64, n), None, bits=4, group_size=64,
          symmetric=True),
      "nm_2_4_float": nm,
      "nm_2_4_q4": formats.NMSparse(q(4, 32, rows=k // 2), nm.indices, shape=(k, n),
                                    dtype=jnp.float32, n=2, m=4),
      "sparse_outliers": so,
      "kept_rows": kr,
      "lowrank_q4": formats.LowRank(
          formats.QuantizedArray.from_codes(jnp.asarray(rng.integers(0, 16, (k, 16))),
                                            f16(k // 64, 16), None, bits=4, group_size=64,
                                            symmetric=True), jnp.asarray(w[:16]),
          dtype=jnp.float32),
      "sum_spqr_like": formats.SumArray((q(3, 16), so, kr, lr), shape=(k, n), dtype=jnp.float32),
      "transposed_q4": formats.Transposed(qt),
      "vq_d2_4bit": formats.VQArray.from_codes(
          rng.integers(0, 16, (k // 2, n)), cb(k // 128, 2, 16, 2), f16(k // 128, 2), dim=2,
          group_size=128, out_block=n // 2),
      "vq_d4_8bit": formats.VQArray.from_codes(
          rng.integers(0, 256, (k // 4, n)), cb(1, 1, 256, 4), f16(1, 1), dim=4, group_size=k,
          out_block=n),
      "aqlm_2x8": formats.AdditiveCodebookArray.from_codes(
          jnp.asarray(rng.integers(0, 256, (k // 8, n, 2))),
          jnp.asarray(rng.standard_normal((2, 256, 8)).astype(np.float16)), f16(n), nbits=8),
      "aqlm_1x4": formats.AdditiveCodebookArray.from_codes(
          jnp.asarray(rng.integers(0, 16, (k // 8, n, 1))),
          jnp.asarray(rng.standard_normal((1, 16, 8)).astype(np.float16)), f16(n), nbits=4),
      "e8p": formats.E8PArray(jnp.asarray(rng.integers(0, 2**16, (k // 8, n)).astype(np.uint16)),
                              jnp.asarray(0.5, jnp.float32), dtype=jnp.float32),
      "incoherent_q4": formats.Incoherent(q(4, 64), formats.pack(jnp.zeros(k, jnp.uint8), 1),
                                          formats.pack(jnp.ones(n, jnp.uint8), 1)),
  }


LEAVES = _leaves(K, N)


def _activation_copies(w, rows):
  """Bytes of the activation-sized copies a format's definition needs: :class:`Incoherent`
  rotates ``x`` (``M x K``) and the output (``M x N``) with Hadamard transforms."""
  if isinstance(w, formats.Incoherent):
    return 2 * rows * (K + N) * 4
  return 0


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("name", sorted(LEAVES))
def test_xla_product_temporaries_stay_below_the_dense_weight(name, rows):
  w = LEAVES[name]
  x = jax.ShapeDtypeStruct((rows, K), jnp.float32)
  compiled = jax.jit(lambda x, w: formats.dot(x, w, implementation="xla")).lower(x, w).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  dense = K * N * np.dtype(np.float32).itemsize
  assert temp < dense + _activation_copies(w, rows), (
      f"{name} at {rows} rows: {temp} bytes of temporaries, the dense weight is {dense} bytes")


RAGGED_K, RAGGED_N = 384, 64


def _ragged_tile(w):
  """A tile (multiple of the format's alignment) that leaves a remainder tile."""
  align = tiled.row_alignment(w)
  t = align * -(-RAGGED_K // (3 * align))
  while RAGGED_K % t == 0:
    t += align
  assert t < RAGGED_K
  return t


RAGGED = _leaves(RAGGED_K, RAGGED_N, seed=2)


@pytest.mark.parametrize("rows", (5,))
@pytest.mark.parametrize("name", sorted(RAGGED))
def test_tiled_products_match_the_materialized_weight(name, rows):
  w = RAGGED[name]
  rng = np.random.default_rng(rows)
  x = rng.standard_normal((rows, RAGGED_K)).astype(np.float32)
  ref = x.astype(np.float64) @ np.asarray(w.materialize(), np.float64)
  outs = {"dot": jax.jit(formats.dot)(jnp.asarray(x), w)}
  if tiled.has_rows_decoder(w):
    tile = _ragged_tile(w)
    outs[f"tile={tile}"] = jax.jit(lambda x, w: tiled.tiled_dot(x, w, tile=tile))(
        jnp.asarray(x), w)
  for how, y in outs.items():
    err = np.abs(np.asarray(y) - ref).max() / np.abs(ref).max()
    assert err < 2e-6, (name, rows, how, err)
