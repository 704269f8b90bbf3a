"""A compressed checkpoint written block by block, so the engine never holds the whole output.

:class:`StreamWriter` is the output of a calibration run that keeps no finished block in
memory (:func:`compressjax.calibration.run_sequential` with ``output=``): each compressed block
is written as soon as it is finished into the checkpoint's temporary directory and dropped;
then the parameters outside the blocks (embedding, final norm, head) are written, one part per
:meth:`StreamWriter.add_leaves` call (the engine writes them one leaf at a time), every part is
read back and checked against its checksums, the manifest is completed, and
the directory is renamed into place atomically (:meth:`StreamWriter.commit`), exactly as
:func:`compressjax.checkpoint.save` does. Until then the destination path is unchanged; a failure
(:meth:`StreamWriter.abort`, or leaving the ``with`` block by an exception) removes the
temporary directory. A process that is killed leaves its temporary sibling
(``.<name>.tmp-*``) behind, as an interrupted :func:`~compressjax.checkpoint.save` does.

On disk (module docstring of :mod:`compressjax.checkpoint`): ``blocks/<i>/`` is block ``i``'s
part, a small checkpoint of its own (``manifest.json`` + ``arrays/``, leaf paths relative to
the block); the top-level ``manifest.json`` lists every leaf of the model with its full path,
and a block leaf's entry names its part (``"part": "blocks/00003"``) and its index there;
``outside/<k>/`` are the parts of the leaves outside the blocks (``"part": "outside/00000"``,
one per :meth:`StreamWriter.add_leaves` call); ``arrays/`` is empty.
:func:`compressjax.checkpoint.restore` (and so ``compressjax eval`` and the exporters) reads it
as any checkpoint: the arrays are the same, only where they lie differs.

**With a resume directory** (``calibration.resume_dir``) the engine writes every finished block
once, as ``<resume_dir>/blocks/<i>``: :meth:`StreamWriter.add_block` with ``source=`` then
*hard-links* that part's files into the output (each block is written to disk once; a copy only
where the two directories lie on different file systems). The resume directory's files are
never modified in place (a rewrite is a new directory renamed over the old one), so the linked
files stay valid however the resume directory changes later.

**Several processes** (``jax.distributed``: a TPU pod, several GPU hosts, or processes on one
machine with CPU collectives): every process creates the writer with the same path and makes
the same calls in the same order (the engine does: :func:`compressjax.calibration.run_sequential`
with the same arguments everywhere). Process 0 creates the temporary directory (its name is
broadcast); each finished block is written by :func:`compressjax.checkpoint.save`'s
several-process path (every process writes the shards it holds of the block's arrays, split
over the processes or not, and process 0 merges the shards' checksums into the part's
manifest once every process is done), so a part exists only when all processes finished the
block; linking a resume directory's part and every other file operation is process 0's, each
step followed by an all-gather of every process's success (a barrier), so a failure that any
process catches makes every process raise. The leaves outside the blocks are saved the same
way as parts; :meth:`StreamWriter.finalize` verifies every part in every
process (each reads it in full, one part at a time) and process 0 writes the manifest;
:meth:`StreamWriter.commit` is process 0's rename, its success gathered by all. With a resume
directory, the resume point is written by every process together after each block
(:func:`compressjax.checkpoint.save`), so a resumed run continues after the last block that
every process completed. A process that dies leaves the others waiting in the next barrier
until the distributed runtime's timeout; :meth:`StreamWriter.abort` then removes the temporary
directory (process 0). The path must be on a file system all processes share.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import checkpoint
from compressjax.blocks import unflatten
from compressjax.transforms.selection import leaves_with_paths

__all__ = ["StreamWriter", "abstract_leaves"]

#: The directories of a streamed checkpoint's parts: the blocks', the outside leaves'.
_PART_DIRS = ("blocks", "outside")


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


class _NotMine:
  """The swap of a process other than 0 with several processes: it knows the temporary
  directory (process 0's, broadcast) and never creates, renames or removes anything."""

  def __init__(self, path: str, tmp: str):
    self.path, self.parent, self.tmp = path, os.path.dirname(path), tmp

  def install(self, overwrite: bool) -> None:
    del overwrite
    self.tmp = None

  def undo(self) -> None:
    self.tmp = None


def _sync(ok: bool, error: BaseException | None, where: str) -> None:
  """Every process's success of the step just done (an all-gather: also a barrier); raises in
  every process if any failed (its own error where it had one)."""
  oks = checkpoint._all_ok(ok)  # pylint: disable=protected-access
  if oks.all():
    return
  if error is not None:
    raise error  # this process's own failure, as it was raised
  raise checkpoint.CheckpointError(f"{where} failed in process(es) "
                                   f"{[int(i) for i in np.flatnonzero(oks == 0)]} (see their "
                                   "errors)")


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
      # params holds abstract placeholders; the written model:
      restored, _ = w.restore()
      w.commit(metadata={...}, tokenizer=tok)

  The engine calls :meth:`add_block` after each block, :meth:`add_leaves` once per leaf
  outside the blocks and :meth:`finalize` at the end; the caller then may :meth:`restore` the
  finished (not yet installed) checkpoint, e.g. to evaluate it, and :meth:`commit` installs it
  at ``path``.

  Args:
    path: the checkpoint directory to write.
    overwrite: replace an existing compressjax checkpoint at ``path`` (the rules of
      :func:`compressjax.checkpoint.check_output_path`).
    forbidden: paths ``path`` must not overlap (e.g. the input model's directory).

  Raises:
    CheckpointExistsError: ``path`` may not be replaced.
    CheckpointError: the parent cannot be written; with several processes, a failure in
      another process or different paths in different processes (every process raises).
  """

  def __init__(self, path: str, *, overwrite: bool = False, forbidden=()):
    self._multi = jax.process_count() > 1
    if self._multi:
      self._open_processes(path, overwrite, forbidden)
    else:
      self.path = checkpoint.check_output_path(path, overwrite=overwrite, forbidden=forbidden)
      self._swap = checkpoint._Swap(self.path)  # pylint: disable=protected-access
      try:
        self._swap.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.tmp-",
                                          dir=self._swap.parent)
        for d in _PART_DIRS:
          os.mkdir(os.path.join(self._swap.tmp, d))
      except BaseException:
        self._swap.undo()
        raise
    self.overwrite = overwrite
    self._entries: dict[str, dict[str, Any]] = {}  # full leaf path -> manifest entry
    self._parts: dict[int, str] = {}  # block -> part ("blocks/00003")
    self._outside: list[str] = []  # the outside leaves' parts ("outside/00000"), in order
    self._added: dict[str, dict[str, Any]] = {}  # part -> its manifest entries
    self._metadata: dict[str, Any] = {}
    self._state = "open"

  def _open_processes(self, path, overwrite, forbidden) -> None:
    """The constructor with several processes: every process checks the path; process 0
    creates the temporary directory and broadcasts its name."""
    # pylint: disable=protected-access
    import zlib  # pylint: disable=g-import-not-at-top
    where = f"StreamWriter({os.path.abspath(os.fspath(path))!r})"
    error = None
    try:
      self.path = checkpoint.check_output_path(path, overwrite=overwrite, forbidden=forbidden)
    except Exception as e:  # pylint: disable=broad-exception-caught
      self.path, error = os.path.abspath(os.fspath(path)), e
    token = (zlib.crc32(self.path.encode()) & 0x3FFFFFFF) + 1
    got = checkpoint._all_ok(error is None, token)
    if not got[:, 0].all():
      if error is not None:
        raise error
      raise checkpoint.CheckpointError(
          f"{where} failed in process(es) {[int(i) for i in np.flatnonzero(got[:, 0] == 0)]} "
          "(see their errors); nothing was written")
    if (got[:, 1] != token).any():
      raise checkpoint.CheckpointError(
          f"{where}: the processes passed different paths (process {jax.process_index()}: "
          f"{self.path!r}); every process must write the same path, on a file system they share")
    name = swap = None
    if jax.process_index() == 0:
      try:
        swap = checkpoint._Swap(self.path)
        swap.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.tmp-",
                                    dir=swap.parent)
        for d in _PART_DIRS:
          os.mkdir(os.path.join(swap.tmp, d))
        name = os.path.basename(swap.tmp)
      except Exception as e:  # pylint: disable=broad-exception-caught
        error = e
        if swap is not None:
          swap.undo()
    name = checkpoint._broadcast_name(name)
    if name is None:
      if error is not None:
        raise checkpoint.CheckpointError(checkpoint._failure_message(
            self.path, os.path.dirname(self.path), error)) from error
      raise checkpoint.CheckpointError(f"{where} failed: process 0 could not create the "
                                       "temporary directory (see its error)")
    self._swap = swap if swap is not None else _NotMine(
        self.path, os.path.join(os.path.dirname(self.path), name))

  def _step(self, fn, what: str):
    """``fn()`` on process 0 only (with several processes; then a barrier that raises in every
    process if it failed), or here with one process."""
    return self._synced(fn, what, everywhere=False)

  def _everywhere(self, fn, what: str):
    """``fn()`` in every process, then a barrier that raises in every process if any failed."""
    return self._synced(fn, what, everywhere=True)

  def _synced(self, fn, what: str, *, everywhere: bool):
    if not self._multi:
      return fn()
    ok, error, out = True, None, None
    if everywhere or jax.process_index() == 0:
      try:
        out = fn()
      except Exception as e:  # pylint: disable=broad-exception-caught
        ok, error = False, e
    _sync(ok, error, f"StreamWriter({self.path!r}): {what}")
    return out

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
      self._step(lambda: _link_tree(source, dst), f"linking block {i} from {source!r}")
    else:  # several processes: each writes its shards, the part appears when all are done
      checkpoint.save(dst, unflatten(dict(block)), metadata={"block": i})
    self._record(part, prefix, f"of block {i}")
    self._parts[i] = part

  def add_leaves(self, leaves: Mapping[str, Any]) -> None:
    """Writes leaves outside the blocks (``{full path: leaf}``) as the next part
    ``outside/<k>``; may be called several times (one leaf at a time: only that leaf need be
    in memory), each leaf once.

    Raises:
      CheckpointError: a leaf was written already (by a block or an earlier call).
    """
    self._need("open")
    clash = sorted(set(leaves) & set(self._entries))
    if clash:
      raise checkpoint.CheckpointError(f"StreamWriter({self.path!r}): leaves {clash[:4]} were "
                                       "written already")
    part = f"outside/{len(self._outside):05d}"
    # several processes: each writes its shards, the part appears when all are done
    checkpoint.save(os.path.join(self.tmp, part), unflatten(dict(leaves)))
    self._record(part, "", "outside the blocks")
    self._outside.append(part)

  def _record(self, part: str, prefix: str, what: str) -> None:
    """Adds the entries of the written ``part`` (leaf paths relative to ``prefix``)."""
    leaves = checkpoint.read_manifest(os.path.join(self.tmp, part))["leaves"]
    for p, entry in leaves.items():
      full = prefix + p
      if full in self._entries:
        raise checkpoint.CheckpointError(f"StreamWriter({self.path!r}): leaf {full} {what} was "
                                         "written already")
      self._entries[full] = {**entry, "part": part}
    self._added[part] = leaves

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
    entries = dict(self._entries)
    if template is not None:
      order = [p for p, _ in leaves_with_paths(template)]
      missing = [p for p in order if p not in entries]
      extra = sorted(set(entries) - set(order))
      if missing or extra:
        raise checkpoint.CheckpointError(
            f"StreamWriter({self.path!r}): the written leaves are not the model's: missing "
            f"{missing[:4]}, not in the model {extra[:4]}")
      entries = {p: entries[p] for p in order}
    if verify:  # several processes: every process reads every part (one at a time)
      for part in [*(self._parts[i] for i in sorted(self._parts)), *self._outside]:
        self._everywhere(lambda part=part: self._verify(part), f"verifying part {part}")
    # no leaf lies in arrays/; a checkpoint has the directory all the same
    self._step(lambda: os.makedirs(os.path.join(self.tmp, "arrays"), exist_ok=True),
               "creating arrays/")
    self._metadata = dict(metadata or {})
    self._manifest = {"format_version": checkpoint.FORMAT_VERSION, "leaves": entries,
                      "metadata": self._metadata}
    self._step(lambda: self._write_manifest(None), "writing the manifest")
    self._state = "finalized"
    return self.tmp

  def _verify(self, part: str) -> None:
    where = os.path.join(self.tmp, part)
    sums = lambda leaves: {p: (e["crc32"], e["index"]) for p, e in leaves.items()}
    if sums(checkpoint.read_manifest(where)["leaves"]) != sums(self._added[part]):
      raise checkpoint.CheckpointError(f"StreamWriter({self.path!r}): part {where!r} changed "
                                       "since it was added")
    checkpoint.restore(where)  # every array against its checksum; dropped at once

  def _write_manifest(self, tokenizer) -> None:
    try:
      text = json.dumps(self._manifest, indent=1)
    except (TypeError, ValueError) as e:
      raise TypeError(f"StreamWriter({self.path!r}): metadata is not JSON-serializable ({e})"
                      ) from e
    checkpoint._write_rest(self.tmp, text, tokenizer)  # pylint: disable=protected-access

  def restore(self, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
    """``checkpoint.restore`` of the finalized (not yet installed) checkpoint (with several
    processes: called by every process, as :func:`~compressjax.checkpoint.restore` is)."""
    self._need("finalized")
    return checkpoint.restore(self.tmp, **kwargs)

  def commit(self, *, metadata: dict[str, Any] | None = None, tokenizer=None) -> str:
    """Installs the finalized checkpoint at :attr:`path` atomically (the previous checkpoint
    there, with ``overwrite``, is replaced only once this one is complete); ``metadata`` and
    ``tokenizer`` replace / add to what :meth:`finalize` wrote. Returns :attr:`path`."""
    self._need("finalized")
    if self._multi:
      return self._commit_processes(metadata, tokenizer)
    try:
      self._install(metadata, tokenizer)
    except BaseException as e:
      self.abort()
      if isinstance(e, (checkpoint.CheckpointError, TypeError)) or not isinstance(e, Exception):
        raise
      raise checkpoint.CheckpointError(checkpoint._failure_message(  # pylint: disable=protected-access
          self.path, self._swap.parent, e)) from e
    self._state = "committed"
    return self.path

  def _install(self, metadata, tokenizer) -> None:
    """Writes the final manifest (with ``metadata`` / ``tokenizer`` when given) and renames."""
    if metadata is not None or tokenizer is not None:
      if metadata is not None:
        self._manifest["metadata"] = dict(metadata)
      self._write_manifest(tokenizer)
    self._swap.install(self.overwrite)

  def _commit_processes(self, metadata, tokenizer) -> str:
    """:meth:`commit` with several processes: process 0 writes and renames (its ``metadata``
    and ``tokenizer`` count); every process learns whether it worked."""
    ok, error = True, None
    if jax.process_index() == 0:
      try:
        self._install(metadata, tokenizer)
      except Exception as e:  # pylint: disable=broad-exception-caught
        ok, error = False, e
    oks = checkpoint._all_ok(ok)  # pylint: disable=protected-access
    if not oks.all():
      self.abort()
      if isinstance(error, (checkpoint.CheckpointError, TypeError)):
        raise error
      if error is not None:
        raise checkpoint.CheckpointError(checkpoint._failure_message(  # pylint: disable=protected-access
            self.path, self._swap.parent, error)) from error
      raise checkpoint.CheckpointError(f"StreamWriter({self.path!r}): process 0 could not "
                                       "install the checkpoint (see its error); the path is "
                                       "unchanged")
    self._swap.tmp = None
    self._state = "committed"
    return self.path

  def abort(self) -> None:
    """Removes everything written; ``path`` stays as it was. Safe to call more than once.
    With several processes it is process 0's (no barrier: it also runs after a failure)."""
    if self._state in ("committed", "aborted"):
      return
    self._swap.undo()
    self._swap.tmp = None
    self._state = "aborted"
