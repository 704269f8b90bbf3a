"""Text sources, tokenization, evaluation windows and calibration sampling.

The standard protocol (``../shared/data/README.md``) is implemented by :func:`protocol_eval_windows`
and :func:`protocol_calibration_windows`; the building blocks accept any text file, directory of
text files, or (where a network exists) a Hugging Face dataset given as ``hf:NAME[:CONFIG]:SPLIT``.
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Sequence

import numpy as np

__all__ = [
    "default_data_dir",
    "read_text",
    "encode",
    "eval_windows",
    "sample_windows",
    "protocol_eval_windows",
    "protocol_calibration_windows",
    "AUSTEN_CALIBRATION",
    "check_positive",
]

AUSTEN_CALIBRATION = ("emma", "mansfield_park", "northanger_abbey", "persuasion",
                      "sense_and_sensibility")
EVAL_CORPORA = {"wiki": "wiki/enwiki_sample.txt", "austen": "austen/pride_and_prejudice.txt"}


def default_data_dir() -> str:
  """``$COMPRESSJAX_DATA`` or ``../shared/data`` next to the project (the offline corpora)."""
  env = os.environ.get("COMPRESSJAX_DATA")
  if env:
    return env
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(os.path.dirname(here), "shared", "data")


def read_text(source: str) -> str:
  """Reads a text source.

  Args:
    source: a text file; a directory (all ``*.txt`` files below it, sorted by path, joined by a
      blank line); or ``hf:NAME[:CONFIG]:SPLIT`` for a Hugging Face dataset (needs the ``datasets``
      package and a network; the ``text`` column is joined by newlines).
  """
  if source.startswith("hf:"):
    parts = source[3:].split(":")
    if len(parts) not in (2, 3):
      raise ValueError(f"text source {source!r}: expected 'hf:NAME[:CONFIG]:SPLIT'")
    try:
      import datasets  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"text source {source!r} needs the 'datasets' package") from e
    name, split = parts[0], parts[-1]
    config = parts[1] if len(parts) == 3 else None
    ds = datasets.load_dataset(name, config, split=split)
    return "\n".join(ds["text"])
  if os.path.isdir(source):
    files = sorted(glob.glob(os.path.join(source, "**", "*.txt"), recursive=True))
    if not files:
      raise FileNotFoundError(f"text source {source!r}: directory holds no *.txt files")
    return "\n\n".join(read_text(f) for f in files)
  if not os.path.isfile(source):
    raise FileNotFoundError(f"text source {source!r}: no such file or directory")
  with open(source, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"text source {source!r}: not valid UTF-8 text (byte offset {e.start}: "
                     f"{e.reason})") from e
  if not text.strip():
    raise ValueError(f"text source {source!r}: holds no text (empty or whitespace only)")
  return text


def encode(tokenizer, text: str) -> np.ndarray:
  """Encodes ``text`` in one call, with no BOS/EOS added, to an int32 token stream."""
  return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)


def check_positive(**values) -> None:
  """Raises ``ValueError`` naming the first setting (keyword name) that is not an int >= 1."""
  for k, v in values.items():
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{k} must be a positive integer, got {v!r}")


def eval_windows(tokens: np.ndarray, seq_len: int, num_windows: int | None = None) -> np.ndarray:
  """Cuts a token stream into non-overlapping windows ``(n, seq_len)``; the first ``num_windows``."""
  check_positive(seq_len=seq_len)
  if num_windows is not None:
    check_positive(num_windows=num_windows)
  n = len(tokens) // seq_len
  if num_windows is not None:
    if num_windows > n:
      raise ValueError(f"num_windows={num_windows} but the text only has {n} windows of {seq_len} tokens")
    n = num_windows
  if n == 0:
    raise ValueError(f"text has {len(tokens)} tokens, fewer than one window of seq_len={seq_len}")
  return tokens[: n * seq_len].reshape(n, seq_len)


def sample_windows(tokens: np.ndarray, num: int, seq_len: int, seed: int) -> np.ndarray:
  """Draws ``num`` windows with start positions uniform in ``[0, len - seq_len]``.

  Uses ``np.random.default_rng(seed).integers``: the same seed gives the same windows. Asking
  for more windows than the text holds without overlap (``len // seq_len``) is an error: the
  draw would repeat the same text many times over.
  """
  check_positive(num=num, seq_len=seq_len)
  if len(tokens) < seq_len:
    raise ValueError(f"calibration text has {len(tokens)} tokens, fewer than seq_len={seq_len}")
  if num > len(tokens) // seq_len:
    raise ValueError(f"{num} calibration windows of {seq_len} tokens asked for, but the text "
                     f"({len(tokens)} tokens) holds only {len(tokens) // seq_len} without "
                     "overlap; use fewer or shorter windows, or more text")
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(tokens) - seq_len + 1, size=num)
  return np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int32)


@functools.lru_cache(maxsize=16)
def _encoded_file(tokenizer_key: int, path: str, tokenizer) -> np.ndarray:
  del tokenizer_key  # part of the cache key only
  return encode(tokenizer, read_text(path))


def _encode_file(tokenizer, path: str) -> np.ndarray:
  return _encoded_file(id(tokenizer), os.path.abspath(path), tokenizer)


def protocol_eval_windows(tokenizer, corpus: str, *, data_dir: str | None = None,
                          seq_len: int = 512, num_windows: int = 64) -> np.ndarray:
  """Evaluation windows of the standard protocol for ``corpus`` in ``{'wiki', 'austen'}``."""
  if corpus not in EVAL_CORPORA:
    raise ValueError(f"corpus {corpus!r}: expected one of {sorted(EVAL_CORPORA)}")
  path = os.path.join(data_dir or default_data_dir(), EVAL_CORPORA[corpus])
  return eval_windows(_encode_file(tokenizer, path), seq_len, num_windows)


def protocol_calibration_windows(tokenizer, *, data_dir: str | None = None, num: int = 128,
                                 seq_len: int = 512, seed: int = 0, source: str = "mixed",
                                 eval_windows_skipped: int = 64) -> np.ndarray:
  """Calibration windows of the standard protocol.

  Args:
    tokenizer: the model's tokenizer.
    data_dir: the corpora directory (default :func:`default_data_dir`).
    num, seq_len, seed: how many windows, of how many tokens, drawn with which seed.
    source: ``"mixed"`` (the wiki stream after its evaluation windows, then the five Austen
      novels other than Pride and Prejudice, each encoded whole, concatenated in the order of
      :data:`AUSTEN_CALIBRATION`), ``"austen"`` (the five novels alone), ``"wiki"`` (the wiki
      stream after its evaluation windows alone), or any text source accepted by
      :func:`read_text`.
    eval_windows_skipped: how many leading wiki windows are reserved for evaluation.
  """
  d = data_dir or default_data_dir()
  austen = lambda: [_encode_file(tokenizer, os.path.join(d, "austen", f"{n}.txt"))
                    for n in AUSTEN_CALIBRATION]
  wiki = lambda: _encode_file(tokenizer, os.path.join(d, EVAL_CORPORA["wiki"]))[
      eval_windows_skipped * seq_len:]
  if source == "mixed":
    stream = np.concatenate([wiki(), *austen()])
  elif source == "austen":
    stream = np.concatenate(austen())
  elif source == "wiki":
    stream = wiki()
  else:
    stream = encode(tokenizer, read_text(source))
  return sample_windows(stream, num, seq_len, seed)


def batches(windows: np.ndarray, batch_size: int) -> Sequence[np.ndarray]:
  """Splits windows into batches of ``batch_size`` (the last one may be smaller)."""
  return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
