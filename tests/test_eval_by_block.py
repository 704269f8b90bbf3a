"""Block-wise evaluation of a checkpoint (issue 12, items 3 and 6): the perplexity of a model
read one block at a time equals the whole model's, and no restore reads more than one block or
the leaves outside the blocks."""

import jax
import numpy as np
import pytest

import tiny
from test_calibration import _windows
from compressjax import calibration, checkpoint, checkpoint_stream, evaluate, transforms as T
from compressjax.blocks import BlockModel, LlamaBlocks
from compressjax.io import build_model


def _streamed(tmp_path, model, transform):
  out = str(tmp_path / "streamed")
  with checkpoint_stream.StreamWriter(out) as w:
    calibration.run_sequential(model, _windows(), transform, batch_size=4, progress=False,
                               output=w)
    w.commit()
  return out


@pytest.mark.parametrize("tied", [True, False])
def test_by_block_equals_the_whole_model(tmp_path, tied):
  model = tiny.tiny_model(seed=7, num_layers=3, tie_word_embeddings=tied)
  # untied: the head is compressed too (a data-free update outside the blocks)
  recipe = T.gptq(bits=3, group_size=32, blocksize=16)
  if not tied:
    recipe = T.chain(recipe, T.rtn(bits=4, group_size=32, where="lm_head/kernel"))
  path = _streamed(tmp_path, model, recipe)
  params, _ = checkpoint.restore(path)
  if not tied:
    assert not isinstance(params["lm_head"]["kernel"], jax.Array)  # compressed
  whole = build_model(model.cfg, params)
  rng = np.random.default_rng(1)
  windows = {"a": rng.integers(0, 300, (5, 48)).astype(np.int32),
             "b": rng.integers(0, 300, (3, 48)).astype(np.int32),
             "c": rng.integers(0, 300, (2, 24)).astype(np.int32)}  # another length
  got = evaluate.perplexity_by_block(LlamaBlocks.from_checkpoint(model.cfg, path), windows,
                                     batch_size=2, progress=False)
  assert list(got) == ["a", "b", "c"]
  for k, w in windows.items():
    want = evaluate.perplexity(whole, w, batch_size=2, progress=False)
    assert got[k]["n_tokens"] == want["n_tokens"] == w.shape[0] * (w.shape[1] - 1)
    assert got[k]["nll"] == pytest.approx(want["nll"], rel=1e-5), k
    assert got[k]["ppl"] == pytest.approx(want["ppl"], rel=1e-5), k
  # Corpora are independent: one corpus alone gives its own result (up to float rounding).
  alone = evaluate.perplexity_by_block(LlamaBlocks.from_checkpoint(model.cfg, path),
                                       {"b": windows["b"]}, batch_size=2, progress=False)
  assert alone["b"]["nll"] == pytest.approx(got["b"]["nll"], rel=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_no_restore_reads_more_than_one_block(tmp_path, monkeypatch, tied):
  model = tiny.tiny_model(seed=8, num_layers=3, tie_word_embeddings=tied)
  path = _streamed(tmp_path, model, T.gptq(bits=4, group_size=32))
  leaves = list(checkpoint.read_manifest(path)["leaves"])
  real = checkpoint.restore
  reads = []

  def spy(p, **kw):
    params, meta = real(p, **kw)
    sel = kw.get("select")
    assert sel is not None, "the whole checkpoint was restored"
    reads.append(sorted(q for q in leaves if sel(q)))
    return params, meta

  monkeypatch.setattr(checkpoint, "restore", spy)
  evaluate.perplexity_by_block(LlamaBlocks.from_checkpoint(model.cfg, path),
                               {"w": _windows(n=3, t=24)}, batch_size=2, progress=False)
  blocks = [sorted(q for q in leaves if q.startswith(f"layers/{i}/")) for i in range(3)]
  # the embedding, each block once, the final norm and the (tied) head
  head = "embed/embedding" if tied else "lm_head/kernel"
  assert reads == [["embed/embedding"]] + blocks + [sorted([head, "norm/scale"])]


def test_restore_select(tmp_path):
  model = tiny.tiny_model(seed=9)
  path = _streamed(tmp_path, model, T.rtn(bits=4, group_size=32))
  full, _ = checkpoint.restore(path)
  part, meta = checkpoint.restore(path, select=lambda p: p.startswith("layers/1/mlp/"))
  assert list(part) == ["layers"] and list(part["layers"]) == [1]
  assert sorted(part["layers"][1]) == ["mlp"]
  for k, v in part["layers"][1]["mlp"].items():
    for x, y in zip(jax.tree.leaves(v), jax.tree.leaves(full["layers"][1]["mlp"][k])):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert checkpoint.restore(path, select=lambda p: False)[0] == {}
  with pytest.raises(TypeError, match="select must be a callable"):
    checkpoint.restore(path, select="layers/0/")


def test_a_block_model_without_the_final_part_is_refused():
  from other_family import Gpt2Blocks, init_params  # pylint: disable=g-import-not-at-top

  bm = Gpt2Blocks(init_params(seed=0))
  assert isinstance(bm, BlockModel)
  with pytest.raises(NotImplementedError,
                     match="Gpt2Blocks does not implement BlockModel.token_nll"):
    evaluate.perplexity_by_block(bm, {"w": _windows(n=2, t=16)}, progress=False)
