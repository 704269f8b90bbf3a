"""Text sources, windows, calibration sampling, and the standard protocol on the real corpora."""

import os

import numpy as np
import pytest

from compressjax import data


class CharTok:
  """A stand-in tokenizer: one token per byte."""

  class _E:
    def __init__(self, ids):
      self.ids = ids

  def encode(self, text, add_special_tokens=True):
    assert add_special_tokens is False
    return self._E(list(text.encode()))


def test_windows_and_sampling():
  toks = np.arange(1000, dtype=np.int32)
  w = data.eval_windows(toks, 100, 4)
  assert w.shape == (4, 100) and w[1, 0] == 100
  assert data.eval_windows(toks, 300).shape == (3, 300)
  with pytest.raises(ValueError, match="num_windows=20"):
    data.eval_windows(toks, 100, 20)
  a = data.sample_windows(toks, 8, 50, seed=0)
  b = data.sample_windows(toks, 8, 50, seed=0)
  c = data.sample_windows(toks, 8, 50, seed=1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert (np.diff(a, axis=1) == 1).all()  # contiguous slices of the stream
  with pytest.raises(ValueError, match="seq_len"):
    data.sample_windows(toks[:10], 1, 50, seed=0)


def test_read_text_sources(tmp_path):
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "b.txt").write_text("second")
  (tmp_path / "d" / "a.txt").write_text("first")
  assert data.read_text(str(tmp_path / "d")) == "first\n\nsecond"
  assert data.read_text(str(tmp_path / "d" / "a.txt")) == "first"
  with pytest.raises(FileNotFoundError, match="nope"):
    data.read_text(str(tmp_path / "nope"))
  (tmp_path / "e").mkdir()
  with pytest.raises(FileNotFoundError, match="no \\*.txt"):
    data.read_text(str(tmp_path / "e"))
  with pytest.raises(ValueError, match="hf:NAME"):
    data.read_text("hf:onlyname")


def test_protocol_calibration_never_overlaps_evaluation(tiny_data):
  tok = CharTok()
  ev = data.protocol_eval_windows(tok, "wiki", data_dir=tiny_data, seq_len=64, num_windows=4)
  cal = data.protocol_calibration_windows(tok, data_dir=tiny_data, num=16, seq_len=64, seed=0,
                                          eval_windows_skipped=4)
  assert cal.shape == (16, 64)
  wiki = data.encode(tok, data.read_text(os.path.join(tiny_data, "wiki/enwiki_sample.txt")))
  eval_region = wiki[: 4 * 64]
  np.testing.assert_array_equal(ev.ravel(), eval_region)
  pp = data.encode(tok, data.read_text(os.path.join(tiny_data, "austen/pride_and_prejudice.txt")))
  for w in cal:  # no calibration window is a slice of the evaluation text
    for src in (eval_region, pp):
      hay = src.tobytes()
      assert w.tobytes() not in hay
  with pytest.raises(ValueError, match="corpus"):
    data.protocol_eval_windows(tok, "books", data_dir=tiny_data)
