"""A compressed checkpoint written block by block, so the engine never holds the whole output.

:class:`StreamWriter` is the output of a calibration run that keeps no finished block in
memory (:func:`compressjax.calibration.run_sequential` with ``output=``): each compressed block
is written as soon as it is finished into the checkpoint's temporary directory and dropped;
at the end the parameters outside the blocks (embedding, final norm, head) are written, every
block's part is read back and checked against its checksums, the manifest is completed, and
the directory is renamed into place atomically (:meth:`StreamWriter.commit`), exactly as
:func:`compressjax.checkpoint.save` does. Until then the destination path is unchanged; a failure
(:meth:`StreamWriter.abort`, or leaving the ``with`` block by an exception) removes the
temporary directory. A process that is killed leaves its temporary sibling
(``.<name>.tmp-*``) behind, as an interrupted :func:`~compressjax.checkpoint.save` does.

On disk (module docstring of :mod:`compressjax.checkpoint`): ``blocks/<i>/`` is block ``i``'s
part, a small checkpoint of its own (``manifest.json`` + ``arrays/``, leaf paths relative to
the block); the top-level ``manifest.json`` lists every leaf of the model with its full path,
and a block leaf's entry names its part (``"part": "blocks/00003"``) and its index there;
``arrays/`` holds the leaves outside the blocks. :func:`compressjax.checkpoint.restore` (and so
``compressjax eval`` and the exporters) reads it as any checkpoint: the arrays are the same, only
where they lie differs.

**With a resume directory** (``calibration.resume_dir``) the engine writes every finished block
once, as ``<resume_dir>/blocks/<i>``: :meth:`StreamWriter.add_block` with ``source=`` then
*hard-links* that part's files into the output (each block is written to disk once; a copy only
where the two directories lie on different file systems). The resume directory's files are
never modified in place (a rewrite is a new directory renamed over the old one), so the linked
files stay valid however the resume directory changes later.

One process only: with ``jax.process_count() > 1`` the constructor raises (save the returned
tree with :func:`compressjax.checkpoint.save` instead).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from compressjax import checkpoint
from compressjax.blocks import unflatten
from compressjax.transforms.selection import leaves_with_paths

__all__ = ["StreamWriter", "abstract_leaves"]


def abstract_leaves(path: str, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
  """The tree of the checkpoint at ``path`` with ``jax.ShapeDtypeStruct`` arrays, read from its
  manifest alone (no array is read): compressed leaves keep their format and static metadata.

  Raises:
    CheckpointError: not a checkpoint, or a format that is not registered.
  """
  manifest = checkpoint.read_manifest(path) if manifest is None else manifest
  tree: dict[str, Any] = {}
  for p, entry in manifest["leaves"].items():
    children = {n: jax.ShapeDtypeStruct(tuple(c["shape"]), jnp.dtype(c["dtype"]))
                for n, c in entry["children"].items()}
    if entry["kind"] == "dense":
      leaf = children["value"]
    else:
      leaf = checkpoint._build_node(  # pylint: disable=protected-access
          entry["tree"], children, path, manifest["format_version"])
    checkpoint._set(tree, p, leaf)  # pylint: disable=protected-access
  return tree


def _link_tree(src: str, dst: str) -> None:
  """Recreates directory ``src`` at ``dst`` with hard links to its files (copies across file
  systems). Symbolic links are refused: a part holds only what a save wrote."""
  os.mkdir(dst)
  for root, dirs, files in os.walk(src):
    rel = os.path.relpath(root, src)
    out = dst if rel == "." else os.path.join(dst, rel)
    for d in dirs:
      if os.path.islink(os.path.join(root, d)):
        raise checkpoint.CheckpointError(f"{os.path.join(root, d)!r} is a symbolic link; a "
                                         "block checkpoint holds none")
      os.mkdir(os.path.join(out, d))
    for f in files:
      s = os.path.join(root, f)
      if os.path.islink(s):
        raise checkpoint.CheckpointError(f"{s!r} is a symbolic link; a block checkpoint holds "
                                         "none")
      try:
        os.link(s, os.path.join(out, f))
      except OSError:  # another file system (EXDEV) or no hard links there
        shutil.copy2(s, os.path.join(out, f))


class StreamWriter:
  """An output checkpoint written block by block (module docstring).

  Use::

    with checkpoint_stream.StreamWriter(out_dir) as w:
      params, _ = calibration.run_sequential(model, windows, recipe, output=w)
      # params holds abstract placeholders for the blocks; the written model:
      restored, _ = w.restore()
      w.commit(metadata={...}, tokenizer=tok)

  The engine calls :meth:`add_block` after each block and :meth:`add_leaves` +
  :meth:`finalize` at the end; the caller then may :meth:`restore` the finished (not yet
  installed) checkpoint, e.g. to evaluate it, and :meth:`commit` installs it at ``path``.

  Args:
    path: the checkpoint directory to write.
    overwrite: replace an existing compressjax checkpoint at ``path`` (the rules of
      :func:`compressjax.checkpoint.check_output_path`).
    forbidden: paths ``path`` must not overlap (e.g. the input model's directory).

  Raises:
    CheckpointExistsError: ``path`` may not be replaced.
    CheckpointError: the parent cannot be written.
    ValueError: several processes (``jax.distributed``).
  """

  def __init__(self, path: str, *, overwrite: bool = False, forbidden=()):
    if jax.process_count() > 1:
      raise ValueError("StreamWriter writes from one process; with several processes "
                       "(jax.distributed) save the returned tree with checkpoint.save")
    self.path = checkpoint.check_output_path(path, overwrite=overwrite, forbidden=forbidden)
    self.overwrite = overwrite
    self._swap = checkpoint._Swap(self.path)  # pylint: disable=protected-access
    try:
      self._swap.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.tmp-",
                                        dir=self._swap.parent)
      os.mkdir(os.path.join(self._swap.tmp, "blocks"))
    except BaseException:
      self._swap.undo()
      raise
    self._entries: dict[str, dict[str, Any]] = {}  # full leaf path -> manifest entry
    self._parts: dict[int, str] = {}  # block -> part ("blocks/00003")
    self._added: dict[int, dict[str, Any]] = {}  # block -> its part's manifest entries
    self._outside: dict[str, Any] | None = None  # manifest of the outside leaves
    self._metadata: dict[str, Any] = {}
    self._state = "open"

  # -- context manager: a failure removes everything written ------------------------------------
  def __enter__(self) -> "StreamWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if self._state != "committed":
      self.abort()

  @property
  def tmp(self) -> str:
    """The temporary directory being written (renamed to :attr:`path` by :meth:`commit`)."""
    if self._swap.tmp is None:
      raise checkpoint.CheckpointError(f"StreamWriter({self.path!r}) is {self._state}")
    return self._swap.tmp

  def _need(self, *states: str) -> None:
    if self._state not in states:
      raise checkpoint.CheckpointError(f"StreamWriter({self.path!r}): this step needs the "
                                       f"writer {' or '.join(states)}, it is {self._state}")

  @property
  def blocks_written(self) -> list[int]:
    return sorted(self._parts)

  def add_block(self, i: int, prefix: str, block: Mapping[str, Any] | None = None, *,
                source: str | None = None) -> None:
    """Writes finished block ``i`` (its leaves ``{path relative to prefix: leaf}``) as part
    ``blocks/<i>``, or hard-links the block checkpoint ``source`` (a resume directory's
    ``blocks/<i>``, whose leaf paths are relative to ``prefix`` too).

    Raises:
      CheckpointError: the block was written already, or ``source`` is not a checkpoint.
      ValueError: both or neither of ``block`` and ``source``.
    """
    self._need("open")
    if (block is None) == (source is None):
      raise ValueError("add_block: pass exactly one of block= and source=")
    if i in self._parts:
      raise checkpoint.CheckpointError(f"StreamWriter({self.path!r}): block {i} was written "
                                       "already")
    part = f"blocks/{i:05d}"
    dst = os.path.join(self.tmp, part)
    if source is not None:
      checkpoint.read_manifest(source)  # a checkpoint at all?
      _link_tree(source, dst)
    else:
      checkpoint.save(dst, unflatten(dict(block)), metadata={"block": i})
    manifest = checkpoint.read_manifest(dst)
    for p, entry in manifest["leaves"].items():
      full = prefix + p
      if full in self._entries:
        raise checkpoint.CheckpointError(f"StreamWriter({self.path!r}): leaf {full} of block {i}"
                                         " was written already")
      self._entries[full] = {**entry, "part": part}
    self._parts[i] = part
    self._added[i] = manifest["leaves"]

  def add_leaves(self, leaves: Mapping[str, Any]) -> None:
    """Writes the leaves outside the blocks (``{full path: leaf}``) into ``arrays/``, once."""
    self._need("open")
    if self._outside is not None:
      raise checkpoint.CheckpointError(f"StreamWriter({self.path!r}): add_leaves was called "
                                       "already")
    clash = sorted(set(leaves) & set(self._entries))
    if clash:
      raise checkpoint.CheckpointError(f"StreamWriter({self.path!r}): leaves {clash[:4]} were "
                                       "written with a block already")
    # pylint: disable=protected-access
    manifest, _, arrays = checkpoint._prepare(self.path, unflatten(dict(leaves)), None,
                                              self.overwrite)
    checkpoint._write_arrays(os.path.join(self.tmp, "arrays"), arrays)
    self._outside = manifest["leaves"]

  def finalize(self, template: Any = None, *, metadata: dict[str, Any] | None = None,
               verify: bool = True) -> str:
    """Checks every block's part and writes the manifest; returns the temporary directory
    (a complete checkpoint, not yet at :attr:`path`).

    Args:
      template: a tree of the whole model (e.g. the abstract parameters): the manifest lists
        the leaves in its order, and each of its leaves must have been written exactly once.
      metadata: JSON-serializable extras (may be replaced by :meth:`commit`).
      verify: read every block's part back (one at a time) and check its arrays against the
        checksums recorded when it was added.

    Raises:
      CheckpointError: a leaf of ``template`` was never written (or one was written that it
        does not hold), a part fails its checksums or changed since it was added.
    """
    self._need("open")
    if self._outside is None:
      self.add_leaves({})
    entries = {**self._entries, **self._outside}
    if template is not None:
      order = [p for p, _ in leaves_with_paths(template)]
      missing = [p for p in order if p not in entries]
      extra = sorted(set(entries) - set(order))
      if missing or extra:
        raise checkpoint.CheckpointError(
            f"StreamWriter({self.path!r}): the written leaves are not the model's: missing "
            f"{missing[:4]}, not in the model {extra[:4]}")
      entries = {p: entries[p] for p in order}
    if verify:
      for i, part in sorted(self._parts.items()):
        where = os.path.join(self.tmp, part)
        sums = lambda leaves: {p: (e["crc32"], e["index"]) for p, e in leaves.items()}
        if sums(checkpoint.read_manifest(where)["leaves"]) != sums(self._added[i]):
          raise checkpoint.CheckpointError(f"StreamWriter({self.path!r}): block {i}'s part "
                                           f"{where!r} changed since it was added")
        checkpoint.restore(where)  # every array against its checksum; dropped at once
    self._metadata = dict(metadata or {})
    self._manifest = {"format_version": checkpoint.FORMAT_VERSION, "leaves": entries,
                      "metadata": self._metadata}
    self._write_manifest(None)
    self._state = "finalized"
    return self.tmp

  def _write_manifest(self, tokenizer) -> None:
    try:
      text = json.dumps(self._manifest, indent=1)
    except (TypeError, ValueError) as e:
      raise TypeError(f"StreamWriter({self.path!r}): metadata is not JSON-serializable ({e})"
                      ) from e
    checkpoint._write_rest(self.tmp, text, tokenizer)  # pylint: disable=protected-access

  def restore(self, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
    """``checkpoint.restore`` of the finalized (not yet installed) checkpoint."""
    self._need("finalized")
    return checkpoint.restore(self.tmp, **kwargs)

  def commit(self, *, metadata: dict[str, Any] | None = None, tokenizer=None) -> str:
    """Installs the finalized checkpoint at :attr:`path` atomically (the previous checkpoint
    there, with ``overwrite``, is replaced only once this one is complete); ``metadata`` and
    ``tokenizer`` replace / add to what :meth:`finalize` wrote. Returns :attr:`path`."""
    self._need("finalized")
    try:
      if metadata is not None or tokenizer is not None:
        if metadata is not None:
          self._manifest["metadata"] = dict(metadata)
        self._write_manifest(tokenizer)
      self._swap.install(self.overwrite)
    except BaseException as e:
      self.abort()
      if isinstance(e, (checkpoint.CheckpointError, TypeError)) or not isinstance(e, Exception):
        raise
      raise checkpoint.CheckpointError(checkpoint._failure_message(  # pylint: disable=protected-access
          self.path, self._swap.parent, e)) from e
    self._state = "committed"
    return self.path

  def abort(self) -> None:
    """Removes everything written; ``path`` stays as it was. Safe to call more than once."""
    if self._state in ("committed", "aborted"):
      return
    self._swap.undo()
    self._swap.tmp = None
    self._state = "aborted"
