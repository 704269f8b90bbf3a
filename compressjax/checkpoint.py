"""Atomic, verified orbax checkpoints of (possibly compressed) parameter trees.

Layout of a checkpoint directory::

    manifest.json   format version, per-leaf description (dense, or a compressed format's
                    registered name, static metadata and children), per-array CRC32 (per shard
                    for an array split over devices), user metadata
    arrays/         orbax StandardCheckpointer save of a flat {leaf_key: array} dict
    tokenizer.json  (optional) the tokenizer, so a checkpoint is self-contained
    blocks/<i>/     (a checkpoint written block by block only) block ``i``'s part: a small
                    checkpoint of its own whose ``arrays/`` hold the block's leaves; their
                    manifest entries name it (``"part": "blocks/00003"``, ``index`` within the
                    part)
    outside/<k>/    (the same) part ``k`` of the leaves outside the blocks; ``arrays/`` is
                    then empty (:class:`compressjax.checkpoint_stream.StreamWriter`)

Arrays split over several devices (a sharded model, :func:`compressjax.formats.tree_shardings`)
are written shard by shard by orbax and checksummed per shard, never gathered into one host
array; :func:`restore` with ``shardings`` reads each device's shard straight into the requested
layout.

**Several processes** (``jax.distributed``: a TPU pod, several GPU hosts, or processes on one
machine with CPU collectives): every process calls :func:`save` with the same path and tree
(arrays split over all processes' devices, arrays every process holds in full). Process 0
creates the temporary directory (its name is broadcast); orbax writes each process's
addressable shards and process 0 the metadata and replicated arrays; each process writes the
CRC32s of its shards to a file of its own; after an all-gather of every process's success
(a barrier) process 0 merges them into ``manifest.json``, checks that every shard of every
split array was checksummed, removes the per-process files and renames the directory into
place; a last all-gather tells every process whether that worked. A failure in any process
(a refused path, bad metadata, different paths in different processes, a write error) makes
every process raise and leaves ``path`` unchanged; a process that dies leaves the others
waiting until the distributed runtime's timeout. The path must be on a file system all
processes share (as orbax requires). :func:`restore` works in one process (every array read in
full, checksums per saved shard) or in every process with global ``shardings`` (each reads and
checks its own shards).

Saving never deletes anything it did not write. The directory is written under a temporary
sibling name and renamed into place only once everything (orbax included) is finished, so an
interrupted save leaves nothing at ``path``. An existing ``path`` is replaced only when it is an
empty directory, or a compressjax checkpoint (our ``manifest.json``, nothing else beside our
files) and ``overwrite=True``; :func:`check_output_path` applies the same rules (and checks for
room and write access) before a long run starts. A failed save removes its temporaries and
raises :class:`CheckpointError` stating the real cause (e.g. a full disk).

Restoring never runs code named by a file: compressed leaves name their format by a key of
:func:`register_format`'s registry (every :mod:`compressjax.formats` class is registered), and
files reached through symbolic links outside the checkpoint directory are refused. It checks the
manifest, the arrays' shapes and dtypes and their checksums, and raises :class:`CheckpointError`
naming the path and what was wrong.

:func:`encode_pytree` / :func:`decode_pytree` store other pytrees (transform states) as data
only: JSON-able structure plus arrays, with named tuples from an allow-list
(:func:`register_state_class`).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import CompressedArray
from compressjax.transforms.selection import leaves_with_paths

__all__ = ["CheckpointError", "CheckpointExistsError", "check_output_path", "decode_pytree",
           "encode_pytree", "read_manifest", "register_format", "register_state_class",
           "restore", "save"]

# 2: nested compressed leaves ("tree" entries); 3: 3-bit codes packed 10 per uint32
# (formats.packing layout 2). Version 2 checkpoints are converted on restore.
FORMAT_VERSION = 3
_READABLE_VERSIONS = (2, 3)
_CODE_LAYOUT = {2: 1, 3: 2}  # format_version -> formats.packing layout of its codes
_KNOWN_VERSIONS = (1, 2, 3)  # versions whose directories we recognise as ours (may be replaced)
MANIFEST = "manifest.json"
# "blocks", "outside": the parts of a checkpoint written block by block
# (:class:`compressjax.checkpoint_stream.StreamWriter`).
_OUR_ENTRIES = frozenset({MANIFEST, "arrays", "tokenizer.json", "blocks", "outside"})
_PART = re.compile(r"(blocks|outside)/[0-9]{5,}")
_PYTREE_ENCODING = "compressjax.pytree/1"


class CheckpointError(ValueError):
  """A checkpoint is missing, partial, corrupted, unsafe or of an unknown format, or a save
  failed or was refused."""


class CheckpointExistsError(CheckpointError, FileExistsError):
  """The output path exists and may not be replaced (a file, a foreign non-empty directory, or
  a checkpoint without ``overwrite=True``)."""


def _crc(x) -> int:
  """CRC32 of the array's bytes (C order), read in place: no copy of a contiguous array."""
  a = np.ascontiguousarray(np.asarray(x))
  return zlib.crc32(a.reshape(-1).view(np.uint8))


def _is_sharded(v) -> bool:
  """Whether ``v`` is a jax.Array split over several devices (saved shard by shard, never
  gathered; with several processes each process checksums the shards it holds)."""
  if not isinstance(v, jax.Array) or v.sharding.is_fully_replicated:
    return False
  return len(v.sharding.device_set) > 1


def _host(v) -> np.ndarray:
  """``v`` as a host array; a replicated array of several processes from this process's copy."""
  if isinstance(v, jax.Array) and not v.is_fully_addressable:
    return np.asarray(v.addressable_data(0))
  return np.asarray(v)


def _index_key(index, shape) -> str:
  return ",".join(f"{sl.start or 0}:{dim if sl.stop is None else sl.stop}"
                  for sl, dim in zip(index, shape))


def _shard_crcs(v) -> dict[str, int]:
  """CRC32 of every distinct shard of ``v``, keyed by its index (``"0:128,0:512"``)."""
  return {_index_key(s.index, v.shape): _crc(s.data) for s in v.addressable_shards
          if s.replica_id == 0}


def _check_shards(a, shards: dict[str, int], where: str) -> None:
  """Checks a restored array against per-shard checksums (per shard when the layout matches).

  An array split over several processes checks the shards this process holds; the saved
  shards that other processes hold in the same layout are theirs to check; a saved shard that
  is no shard of the restored layout is checked on the gathered array.
  """
  left = dict(shards)
  if isinstance(a, jax.Array):
    for s in a.addressable_shards:
      k = _index_key(s.index, a.shape)
      if k in left and s.replica_id == 0:
        if _crc(s.data) != left.pop(k):
          raise CheckpointError(f"{where} fails its checksum (shard {k}; corrupted checkpoint)")
    if not a.is_fully_addressable:
      theirs = {_index_key(i, a.shape) for i in a.sharding.devices_indices_map(a.shape).values()}
      left = {k: c for k, c in left.items() if k not in theirs}
  if left:  # restored in another layout: check the saved shards' regions of the whole array
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      full = np.asarray(multihost_utils.process_allgather(a, tiled=True))
    else:
      full = np.asarray(a)
    for k, crc in left.items():
      idx = tuple(slice(*map(int, r.split(":"))) for r in k.split(","))
      if _crc(full[idx]) != crc:
        raise CheckpointError(f"{where} fails its checksum (shard {k}; corrupted checkpoint)")


# --------------------------------------------------------------------------------------------
# Registries: compressed formats and transform-state classes, by name. Restore looks names up
# here and never imports a module named by a file.
# --------------------------------------------------------------------------------------------

_FORMATS: dict[str, type] = {}
_STATE_CLASSES: dict[str, type] = {}


def _class_key(cls: type) -> str:
  return f"{cls.__module__}:{cls.__qualname__}"


def register_format(cls: type) -> type:
  """Registers a compressed format class so checkpoints holding it can be restored.

  Every :mod:`compressjax.formats` class is registered already; user formats call this once
  (it can be used as a class decorator). The key is ``"module:qualname"``, as manifests write it.

  Args:
    cls: a :class:`~compressjax.formats.CompressedArray` subclass.

  Returns:
    ``cls``.

  Raises:
    TypeError: ``cls`` is not a ``CompressedArray`` subclass.
  """
  if not (isinstance(cls, type) and issubclass(cls, CompressedArray)):
    raise TypeError(f"register_format: cls must be a CompressedArray subclass, got {cls!r}")
  _FORMATS[_class_key(cls)] = cls
  return cls


def _format_registry() -> dict[str, type]:
  if not any(k.startswith("compressjax.") for k in _FORMATS):
    from compressjax import formats  # pylint: disable=g-import-not-at-top
    for name in formats.__all__:
      obj = getattr(formats, name)
      if isinstance(obj, type) and issubclass(obj, CompressedArray) and obj is not CompressedArray:
        _FORMATS.setdefault(_class_key(obj), obj)
  return _FORMATS


def register_state_class(cls: type) -> type:
  """Allows a ``NamedTuple`` class in transform states stored by :func:`encode_pytree`.

  The compressjax transform states (``ChainState``, ``LeafwiseState``, ``SelectState``,
  ``StructuredState``, ``AwqGroup``, ``AwqState``) are registered already; a user transform with
  its own state class calls this once.

  Raises:
    TypeError: ``cls`` is not a ``NamedTuple`` class.
  """
  if not (isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")):
    raise TypeError(f"register_state_class: cls must be a NamedTuple class, got {cls!r}")
  _STATE_CLASSES[_class_key(cls)] = cls
  return cls


def _state_registry() -> dict[str, type]:
  if not any(k.startswith("compressjax.") for k in _STATE_CLASSES):
    # pylint: disable=g-import-not-at-top
    from compressjax.transforms.awq import AwqGroup, AwqState
    from compressjax.transforms.base import ChainState, LeafwiseState, SelectState
    from compressjax.transforms.prune import StructuredState
    for cls in (ChainState, LeafwiseState, SelectState, StructuredState, AwqGroup, AwqState):
      _STATE_CLASSES.setdefault(_class_key(cls), cls)
  return _STATE_CLASSES


def _resolve_class(spec: str, path: str):
  cls = _format_registry().get(spec)
  if cls is None:
    raise CheckpointError(
        f"checkpoint path {path!r}: unknown compressed format {spec!r} (expected one of the "
        f"registered formats {sorted(_FORMATS)}; register user formats with "
        "compressjax.checkpoint.register_format)")
  return cls


# --------------------------------------------------------------------------------------------
# Manifest entries of compressed leaves.
# --------------------------------------------------------------------------------------------


def _encode_static(v):
  if isinstance(v, tuple):
    return {"__tuple__": [_encode_static(e) for e in v]}
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  return {"__dtype__": jnp.dtype(v).name}  # anything else static is a dtype


def _decode_static(v):
  if isinstance(v, dict) and "__tuple__" in v:
    return tuple(_decode_static(e) for e in v["__tuple__"])
  if isinstance(v, dict) and "__dtype__" in v:
    return jnp.dtype(v["__dtype__"])
  return v


def _describe_node(node, name: str, children: dict[str, Any]):
  """Structure spec of one field value; its arrays go into ``children`` under dotted names."""
  if node is None:
    return None
  if isinstance(node, CompressedArray):
    cls = type(node)
    key = _class_key(cls)
    if _format_registry().get(key) is not cls:
      raise TypeError(f"checkpoint.save: compressed format {key!r} is not registered; call "
                      "compressjax.checkpoint.register_format(cls) so it can be restored")
    static, fields = {}, {}
    for f in dataclasses.fields(node):
      v = getattr(node, f.name)
      if f.metadata.get("static"):
        static[f.name] = _encode_static(v)
      else:
        fields[f.name] = _describe_node(v, f.name if not name else f"{name}.{f.name}", children)
    return {"class": key, "static": static, "fields": fields}
  if isinstance(node, (tuple, list)):
    return {"tuple": [_describe_node(v, f"{name}.{i}", children) for i, v in enumerate(node)]}
  children[name] = node
  return {"array": name}


def _describe(leaf) -> tuple[dict[str, Any], dict[str, Any]]:
  """Manifest entry and ``{child_name: array}`` of one leaf.

  A compressed leaf's fields may themselves be compressed leaves or tuples of them (a
  :class:`~compressjax.formats.SumArray` of a quantized base and sparse outliers whose scales
  are quantized again): the entry's ``tree`` records that structure and its arrays are stored
  under dotted names (``terms.0.scale.inner.packed``).
  """
  children: dict[str, Any] = {}
  if isinstance(leaf, CompressedArray):
    tree = _describe_node(leaf, "", children)
    entry = {"kind": "compressed", "tree": tree}
  else:
    children = {"value": leaf}
    entry = {"kind": "dense"}
  entry["children"] = {k: {"shape": list(np.shape(v)), "dtype": jnp.dtype(v.dtype).name}
                       for k, v in children.items()}
  return entry, children


def _build_node(spec, children: dict[str, Any], path: str, version: int = FORMAT_VERSION):
  if spec is None:
    return None
  if "array" in spec:
    return children[spec["array"]]
  if "tuple" in spec:
    return tuple(_build_node(s, children, path, version) for s in spec["tuple"])
  cls = _resolve_class(spec["class"], path)
  static = {k: _decode_static(v) for k, v in spec["static"].items()}
  fields = {k: _build_node(v, children, path, version) for k, v in spec["fields"].items()}
  if version != FORMAT_VERSION:
    from compressjax.formats import legacy  # pylint: disable=g-import-not-at-top
    try:
      fields = legacy.upgrade_fields(cls, static, fields, layout=_CODE_LAYOUT[version],
                                     where=f"checkpoint path {path!r}: {spec['class']}")
    except ValueError as e:
      raise CheckpointError(str(e)) from e
  return cls(**fields, **static)


# --------------------------------------------------------------------------------------------
# Output paths: what may be replaced, forbidden places, room and write access.
# --------------------------------------------------------------------------------------------


def _is_within(child: str, parent: str) -> bool:
  """Whether real path ``child`` is ``parent`` or inside it."""
  return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _existing(path: str, overwrite: bool) -> str | None:
  """What is at ``path``: ``None`` (nothing), ``"empty"`` (an empty directory) or
  ``"checkpoint"`` (ours, replaceable with ``overwrite``); raises for anything else."""
  if not os.path.lexists(path):
    return None
  if os.path.islink(path):
    raise CheckpointExistsError(
        f"output path {path!r} is a symbolic link; refusing to replace it (expected a new path, an "
        "empty directory or a compressjax checkpoint)")
  if not os.path.isdir(path):
    raise CheckpointExistsError(
        f"output path {path!r} is an existing file, not a checkpoint directory; refusing to "
        "replace it (expected a new path, an empty directory or a compressjax checkpoint)")
  entries = set(os.listdir(path))
  if not entries:
    return "empty"
  mpath = os.path.join(path, MANIFEST)
  version = None
  if os.path.isfile(mpath) and not os.path.islink(mpath):
    try:
      with open(mpath, encoding="utf-8") as f:
        m = json.load(f)
      version = m.get("format_version") if isinstance(m, dict) else None
    except (OSError, ValueError):
      version = None
  if version not in _KNOWN_VERSIONS:
    raise CheckpointExistsError(
        f"output path {path!r} is a non-empty directory that is not a compressjax checkpoint "
        f"(no {MANIFEST} with a known format_version); refusing to replace it")
  extra = sorted(entries - _OUR_ENTRIES)
  if extra:
    raise CheckpointExistsError(
        f"output path {path!r} is a compressjax checkpoint that also holds files a checkpoint "
        f"does not write ({extra[:5]}); refusing to replace it")
  if not overwrite:
    raise CheckpointExistsError(
        f"output path {path!r} already holds a compressjax checkpoint; pass overwrite=True to "
        "replace it")
  return "checkpoint"


def _existing_ancestor(path: str) -> str:
  p = os.path.dirname(path)
  while not os.path.lexists(p):
    p = os.path.dirname(p)
  return p


def check_output_path(path: str, *, overwrite: bool, forbidden: Sequence[str] = (),
                      min_free_bytes: int = 0) -> str:
  """Checks, before any long work, that :func:`save` can write a checkpoint at ``path``.

  Args:
    path: the checkpoint directory to be written.
    overwrite: whether an existing compressjax checkpoint at ``path`` may be replaced.
    forbidden: directories (or files) ``path`` must not equal, lie inside, or contain, e.g.
      the input model's directory (a model is never compressed into its own folder).
    min_free_bytes: free space the file system of ``path`` must have.

  Returns:
    The absolute ``path``.

  Raises:
    CheckpointExistsError: ``path`` is a file or symbolic link, a non-empty directory that is not
      a compressjax checkpoint (or holds other files too), or a checkpoint and ``overwrite`` is
      false. An empty directory is accepted.
    CheckpointError: ``path`` overlaps a ``forbidden`` path; its parent cannot be created or
      written; fewer than ``min_free_bytes`` bytes are free.
  """
  path = os.path.abspath(os.fspath(path))
  real = os.path.realpath(path)
  for f in forbidden:
    rf = os.path.realpath(os.path.abspath(os.fspath(f)))
    if _is_within(real, rf) or _is_within(rf, real):
      how = "is" if real == rf else ("is inside" if _is_within(real, rf) else "contains")
      raise CheckpointError(f"output path {path!r} {how} the input {os.fspath(f)!r}; choose an "
                            "output path outside the input model's directory")
  _existing(path, overwrite)
  anc = _existing_ancestor(path)
  if not os.path.isdir(anc):
    raise CheckpointError(f"output path {path!r}: {anc!r} is not a directory, so the parent "
                          "directory cannot be created")
  try:
    fd, probe = tempfile.mkstemp(prefix=".compressjax-probe-", dir=anc)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f"output path {path!r}: cannot write in {anc!r} "
                          f"({e.strerror or e}); expected a writable directory") from e
  if min_free_bytes > 0:
    free = shutil.disk_usage(anc).free
    if free < min_free_bytes:
      raise CheckpointError(f"output path {path!r}: only {free} bytes free on {anc!r}, "
                            f"need at least {min_free_bytes}")
  return path


def _makedirs(parent: str) -> list[str]:
  """``os.makedirs(parent)``; returns the directories it created, deepest first."""
  created = []
  p = parent
  while not os.path.lexists(p):
    created.append(p)
    p = os.path.dirname(p)
  os.makedirs(parent, exist_ok=True)
  return created


def _os_cause(e: BaseException) -> OSError | None:
  """The first ``OSError`` in ``e``'s cause/context chain (exception groups included)."""
  seen, todo = set(), [e]
  while todo:
    x = todo.pop(0)
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    if isinstance(x, OSError):
      return x
    todo.extend(getattr(x, "exceptions", ()) or ())
    todo.extend([x.__cause__, x.__context__])
  return None


def _failure_message(path: str, parent: str, e: BaseException) -> str:
  msg = f"checkpoint save to {path!r} failed"
  cause = _os_cause(e)
  if cause is not None and cause.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
    where = parent
    while not os.path.isdir(where) and os.path.dirname(where) != where:
      where = os.path.dirname(where)  # a parent the failed save created is removed again
    try:
      free = f"{shutil.disk_usage(where).free} bytes free"
    except OSError:
      free = "free space unknown"
    return (f"{msg}: the disk is full (No space left on device; {free} on {where!r}); "
            "the path is unchanged")
  if cause is not None:
    where = f" ({cause.filename!r})" if cause.filename else ""
    return f"{msg}: {cause.strerror or cause}{where}; the path is unchanged"
  return f"{msg}: {type(e).__name__}: {e}; the path is unchanged"


def save(path: str, params: Any, *, metadata: dict[str, Any] | None = None,
         tokenizer=None, overwrite: bool = False) -> str:
  """Saves ``params`` (nested dict; dense and compressed leaves) atomically to ``path``.

  With several processes (``jax.distributed``) every process calls it with the same ``path``
  and tree; arrays split over the processes are written by the processes holding them, never
  gathered (module docstring).

  Args:
    path: target directory (made absolute; orbax needs absolute paths).
    params: the parameter tree.
    metadata: JSON-serializable extras (model config, recipe, results).
    tokenizer: optional ``tokenizers.Tokenizer`` saved as ``tokenizer.json``.
    overwrite: replace an existing compressjax checkpoint at ``path``. Anything else at
      ``path`` (a file, a directory of other files) is never replaced; an empty directory is.

  Returns:
    The absolute path written.

  Raises:
    CheckpointExistsError: ``path`` may not be replaced (see :func:`check_output_path`).
    CheckpointError: the parent cannot be written, lacks room for the arrays, or writing
      failed; the message states the cause (a full disk says so) and no temporary is left.
    TypeError: ``metadata`` is not JSON-serializable, or a compressed format is not registered.
  """
  path = os.path.abspath(os.fspath(path))
  if jax.process_count() > 1:
    token = (zlib.crc32(path.encode()) & 0x3FFFFFFF) + 1  # the same path everywhere?
    try:
      manifest, _, arrays = _prepare(path, params, metadata, overwrite)
    except Exception:
      _all_ok(False, token)  # the other processes raise too instead of waiting for this one
      raise
    got = _all_ok(True, token)
    if not got[:, 0].all():
      raise CheckpointError(f"checkpoint.save({path!r}) failed in process(es) "
                            f"{[int(i) for i in np.flatnonzero(got[:, 0] == 0)]} before writing "
                            "(see their errors); the path is unchanged")
    if (got[:, 1] != token).any():
      raise CheckpointError(f"checkpoint.save({path!r}): the processes passed different paths "
                            f"(process {jax.process_index()}: {path!r}); every process must save "
                            "to the same path, on a file system they share")
    return _save_processes(path, manifest, arrays, tokenizer, overwrite)
  _, manifest_text, arrays = _prepare(path, params, metadata, overwrite)
  swap = _Swap(path)
  try:
    swap.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=swap.parent)
    _write_arrays(os.path.join(swap.tmp, "arrays"), arrays)
    _write_rest(swap.tmp, manifest_text, tokenizer)
    swap.install(overwrite)
  except BaseException as e:
    swap.undo()
    if isinstance(e, CheckpointError) or not isinstance(e, Exception):
      raise
    raise CheckpointError(_failure_message(path, swap.parent, e)) from e
  return path


#: One-device jax arrays at least this large are handed to orbax as they are (no second copy of
#: them while orbax writes); smaller ones as host arrays: orbax kept references to small jax
#: arrays given to it (two ``(64,)`` norm scales per streamed block stayed alive in a test).
_DIRECT_SAVE_BYTES = 1 << 20


def _prepare(path: str, params: Any, metadata, overwrite: bool):
  """``(manifest, manifest_text, arrays)`` of a save, after checking ``path`` and the room."""
  leaves: dict[str, Any] = {}
  arrays: dict[str, Any] = {}
  for i, (p, leaf) in enumerate(leaves_with_paths(params)):
    entry, children = _describe(leaf)
    entry["index"] = i
    entry["crc32"] = {}
    for name, v in children.items():
      key = f"a{i}_{name}"
      if _is_sharded(v):
        # Written shard by shard by orbax; checksummed per shard, never gathered.
        entry["crc32"][name] = {"shards": _shard_crcs(v)}
        arrays[key] = v
        continue
      a = _host(v)
      entry["crc32"][name] = _crc(a)
      if a.size:  # orbax cannot store empty arrays; restore rebuilds them from the manifest
        # A one-device jax array goes to orbax as it is: given its host view instead, orbax
        # writes through a second copy of every array (restore reads them back as numpy
        # either way, so the device named in orbax's sharding file is never used).
        one_device = (isinstance(v, jax.Array) and v.is_fully_addressable and
                      len(v.sharding.device_set) == 1 and a.nbytes >= _DIRECT_SAVE_BYTES)
        arrays[key] = v if one_device else a
    leaves[p] = entry
  manifest = {"format_version": FORMAT_VERSION, "leaves": leaves, "metadata": metadata or {}}
  try:
    manifest_text = json.dumps(manifest, indent=1)
  except (TypeError, ValueError) as e:
    raise TypeError(f"checkpoint.save({path!r}): metadata is not JSON-serializable ({e})") from e
  check_output_path(path, overwrite=overwrite,
                    min_free_bytes=sum(a.nbytes for a in arrays.values()))
  return manifest, manifest_text, arrays


class _Swap:
  """A save in progress: its temporary directory, the parents it created, a checkpoint moved
  aside; :meth:`install` puts the finished temporary at ``path``, :meth:`undo` removes what
  the save wrote and puts a moved-aside checkpoint back."""

  def __init__(self, path: str):
    self.path = path
    self.parent = os.path.dirname(path)
    self.created = _makedirs(self.parent)
    self.tmp: str | None = None
    self.old: str | None = None
    self.moved = False

  def install(self, overwrite: bool) -> None:
    os.chmod(self.tmp, 0o755)  # mkdtemp creates 0700
    kind = _existing(self.path, overwrite)  # again: something may have appeared meanwhile
    if kind == "empty":
      os.rmdir(self.path)  # fails, deleting nothing, if a file appeared in it
    elif kind == "checkpoint":
      self.old = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.old-", dir=self.parent)
      os.rename(self.path, os.path.join(self.old, "checkpoint"))
      self.moved = True
    os.rename(self.tmp, self.path)
    self.tmp = None
    if self.old is not None:
      shutil.rmtree(self.old, ignore_errors=True)  # our own previous checkpoint (overwrite=True)

  def undo(self) -> None:
    if self.tmp is not None:
      shutil.rmtree(self.tmp, ignore_errors=True)
    if self.old is not None:
      if self.moved and not os.path.lexists(self.path):
        os.rename(os.path.join(self.old, "checkpoint"), self.path)  # the previous one stays
      if not os.path.lexists(os.path.join(self.old, "checkpoint")):
        shutil.rmtree(self.old, ignore_errors=True)
    for d in self.created:
      try:
        os.rmdir(d)
      except OSError:
        break


#: Arrays restored per orbax call, by bytes: orbax reads each call's arrays through a transient
#: second copy, so the restore's peak is the model plus about this much (or one larger array).
_RESTORE_BATCH_BYTES = 256 << 20


def _restore_arrays(arrays_dir: str, target: dict[str, jax.ShapeDtypeStruct],
                    partial: bool = False) -> dict[str, Any]:
  """orbax restore of ``{key: ShapeDtypeStruct}`` in batches of about
  :data:`_RESTORE_BATCH_BYTES`: arrays with a ``sharding`` come back as jax arrays in that
  layout, the others as numpy arrays (whatever device orbax's metadata names). ``partial``:
  ``target`` may be a subset of the directory's arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  batches: list[dict[str, Any]] = [{}]
  size = 0
  for key, sds in target.items():
    nbytes = math.prod(sds.shape) * jnp.dtype(sds.dtype).itemsize
    if batches[-1] and size + nbytes > _RESTORE_BATCH_BYTES:
      batches.append({})
      size = 0
    batches[-1][key] = sds
    size += nbytes
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  out: dict[str, Any] = {}
  try:
    for batch in batches:
      args = {k: (ocp.ArrayRestoreArgs(sharding=v.sharding, global_shape=v.shape, dtype=v.dtype)
                  if v.sharding is not None else
                  ocp.RestoreArgs(restore_type=np.ndarray, dtype=v.dtype))
              for k, v in batch.items()}
      out.update(ckptr.restore(arrays_dir, args=ocp.args.PyTreeRestore(
          item=batch, restore_args=args, partial_restore=partial or len(batches) > 1)))
  finally:
    ckptr.close()
  return out


def _write_arrays(arrays_dir: str, arrays: dict[str, Any]) -> None:
  """orbax save of ``arrays`` (every process calls it with the same directory and keys)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if not arrays:
    if jax.process_index() == 0:
      os.mkdir(arrays_dir)
    return
  ckptr = ocp.StandardCheckpointer()
  try:
    ckptr.save(arrays_dir, arrays)
    ckptr.wait_until_finished()
  finally:
    ckptr.close()


def _write_rest(tmp: str, manifest_text: str, tokenizer) -> None:
  if tokenizer is not None:
    tokenizer.save(os.path.join(tmp, "tokenizer.json"))
  with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
    f.write(manifest_text)
    f.flush()
    os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# Several processes (jax.distributed): every process calls save with the same tree.
# --------------------------------------------------------------------------------------------

_CRC_FILE = ".crc32-process-{}.json"


def _all_ok(ok: bool, token: int = 0) -> np.ndarray:
  """Every process's ``ok`` (and ``token``, ``(processes, 2)`` with it), gathered; also a
  barrier: no process passes before all reach it."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  got = np.asarray(multihost_utils.process_allgather(np.asarray([int(ok), token], np.int32)))
  got = got.reshape(-1, 2)
  return got if token else got[:, 0]


def _broadcast_name(name: str | None) -> str | None:
  """Process 0's temporary directory name (``None``: it could not create one), on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  buf = np.zeros(256, np.int32)
  if name is not None:
    raw = np.frombuffer(name.encode(), np.uint8)
    buf[0], buf[1:1 + raw.size] = raw.size, raw
  got = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return None if got[0] == 0 else bytes(got[1:1 + got[0]].astype(np.uint8)).decode()


def _expected_shards(v) -> set[str]:
  return {_index_key(idx, v.shape) for idx in v.sharding.devices_indices_map(v.shape).values()}


def _save_processes(path: str, manifest: dict[str, Any], arrays: dict[str, Any], tokenizer,
                    overwrite: bool) -> str:
  """:func:`save` with ``jax.process_count() > 1``: every process writes the shards it holds
  (orbax: each process its addressable shards, process 0 the metadata and the arrays every
  process holds in full) into one temporary directory that process 0 created; each process
  writes the checksums of its shards beside; after all are done process 0 merges them into the
  manifest, checks that every shard was checksummed, and renames the directory into place. The
  steps are separated by all-gathers of every process's success, so a failure that a process
  catches (ours, or an exception orbax raises) makes every process remove what was written and
  raise; a process that dies, or hangs inside orbax's own barriers, leaves the others waiting
  until orbax's or the distributed runtime's timeout."""
  pid = jax.process_index()
  where = f"checkpoint.save({path!r})"
  swap = name = error = None
  if pid == 0:
    try:
      swap = _Swap(path)
      swap.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=swap.parent)
      name = os.path.basename(swap.tmp)
    except Exception as e:  # pylint: disable=broad-exception-caught
      error = e
  name = _broadcast_name(name)
  if name is None:
    if error is not None:
      if swap is not None:
        swap.undo()
      raise CheckpointError(_failure_message(path, os.path.dirname(path), error)) from error
    raise CheckpointError(f"{where} failed: process 0 could not create the temporary directory "
                          "(see its error); the path is unchanged")
  tmp = os.path.join(os.path.dirname(path), name)

  ok = True
  try:  # every process: its shards, then its checksums
    _write_arrays(os.path.join(tmp, "arrays"), arrays)
    mine = [[p, n, c["shards"]] for p, entry in manifest["leaves"].items()
            for n, c in entry["crc32"].items() if isinstance(c, dict)]
    with open(os.path.join(tmp, _CRC_FILE.format(pid)), "w", encoding="utf-8") as f:
      json.dump(mine, f)
      f.flush()
      os.fsync(f.fileno())
  except Exception as e:  # pylint: disable=broad-exception-caught
    ok, error = False, e
  oks = _all_ok(ok)
  if not oks.all():  # every process sees the same flags: all clean up and raise
    if swap is not None:
      swap.undo()
    if error is not None:
      raise CheckpointError(_failure_message(path, os.path.dirname(path), error)) from error
    raise CheckpointError(f"{where} failed in process(es) "
                          f"{[int(i) for i in np.flatnonzero(oks == 0)]} (see their errors); "
                          "the path is unchanged")
  if pid == 0:
    try:  # process 0: merge the checksums, write the manifest, rename into place
      for q in range(jax.process_count()):
        crc_path = os.path.join(tmp, _CRC_FILE.format(q))
        with open(crc_path, encoding="utf-8") as f:
          for p, n, shards in json.load(f):
            manifest["leaves"][p]["crc32"][n]["shards"].update(shards)
        os.remove(crc_path)
      for p, entry in manifest["leaves"].items():
        for n, c in entry["crc32"].items():
          v = arrays.get(f"a{entry['index']}_{n}")
          if isinstance(c, dict) and set(c["shards"]) != _expected_shards(v):
            raise CheckpointError(f"{where}: array {p}/{n}: the processes checksummed shards "
                                  f"{sorted(c['shards'])}, expected "
                                  f"{sorted(_expected_shards(v))}")
      _write_rest(tmp, json.dumps(manifest, indent=1), tokenizer)
      swap.install(overwrite)
    except Exception as e:  # pylint: disable=broad-exception-caught
      ok, error = False, e
    if not ok:
      swap.undo()
  if _all_ok(ok).all():
    return path
  if error is None:
    raise CheckpointError(f"{where} failed: process 0 could not finish the checkpoint (see its "
                          "error); the path is unchanged")
  if isinstance(error, CheckpointError):
    raise error
  raise CheckpointError(_failure_message(path, os.path.dirname(path), error)) from error


# --------------------------------------------------------------------------------------------
# Data-only encoding of other pytrees (transform states).
# --------------------------------------------------------------------------------------------


def encode_pytree(tree: Any, *, where: str = "state") -> tuple[Any, dict[str, Any]]:
  """Encodes ``tree`` as ``(spec, arrays)``: a JSON-able ``spec`` plus ``{key: array}``.

  Allowed: ``None``, ``bool``, ``int``, ``float``, ``str``; lists and tuples (kept apart); dicts
  with ``str`` or ``int`` keys (key types kept); named tuples of a registered class
  (:func:`register_state_class`); numpy arrays and scalars and jax arrays (dtype, shape and
  numpy vs jax kept). No code is stored: :func:`decode_pytree` rebuilds only these.

  Args:
    tree: the pytree, e.g. a transform state.
    where: name used in error messages.

  Returns:
    ``(spec, arrays)``: ``spec`` is ``{"encoding": "compressjax.pytree/1", "tree": ...}``;
    store ``arrays`` next to the other arrays of a checkpoint and ``spec`` in its metadata.

  Raises:
    TypeError: a value of another type, naming the type and its place in ``tree``.
  """
  arrays: dict[str, Any] = {}
  registry = _state_registry()

  def enc(x, at: str):
    if x is None or isinstance(x, (bool, str)):
      return x
    if isinstance(x, (int, float)) and type(x) in (int, float):
      return x
    if isinstance(x, tuple) and hasattr(type(x), "_fields"):
      key = _class_key(type(x))
      if registry.get(key) is not type(x):
        raise TypeError(f"{where}: {at or 'the root'} is a {key} named tuple, which is not "
                        "registered; call compressjax.checkpoint.register_state_class(cls)")
      return {"namedtuple": key,
              "fields": [enc(v, f"{at}.{n}") for n, v in zip(type(x)._fields, x)]}
    if type(x) in (tuple, list):
      return {type(x).__name__: [enc(v, f"{at}[{i}]") for i, v in enumerate(x)]}
    if type(x) is dict:
      items = []
      for k, v in x.items():
        if type(k) not in (str, int):
          raise TypeError(f"{where}: dict key {k!r} at {at or 'the root'} is a "
                          f"{type(k).__name__}; expected str or int keys")
        items.append([k, enc(v, f"{at}[{k!r}]")])
      return {"dict": items}
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
      kind = ("numpy" if isinstance(x, np.ndarray) else
              "scalar" if isinstance(x, np.generic) else "jax")
      key = f"s{len(arrays)}"
      arrays[key] = np.asarray(x)
      return {"array": key, "kind": kind, "dtype": arrays[key].dtype.name,
              "shape": list(arrays[key].shape)}
    raise TypeError(f"{where}: {at or 'the root'} is a {type(x).__module__}."
                    f"{type(x).__qualname__}, which cannot be stored as data (expected None, "
                    "bool, int, float, str, list, tuple, dict, a registered NamedTuple or an "
                    "array)")

  return {"encoding": _PYTREE_ENCODING, "tree": enc(tree, "")}, arrays


def decode_pytree(spec: Any, arrays: dict[str, Any], *, where: str = "state") -> Any:
  """Inverse of :func:`encode_pytree`; refuses anything it did not write.

  Raises:
    CheckpointError: an unknown node, an unregistered named-tuple class, a missing array or one
      whose dtype/shape differs from the spec.
  """
  registry = _state_registry()

  def bad(msg):
    return CheckpointError(f"{where}: {msg}")

  def dec(s):
    if s is None or isinstance(s, (bool, int, float, str)):
      return s
    if not isinstance(s, dict) or len(s) not in (1, 2, 4):
      raise bad(f"unexpected entry {str(s)[:80]!r} (not written by encode_pytree)")
    if set(s) == {"list"} and isinstance(s["list"], list):
      return [dec(v) for v in s["list"]]
    if set(s) == {"tuple"} and isinstance(s["tuple"], list):
      return tuple(dec(v) for v in s["tuple"])
    if set(s) == {"dict"} and isinstance(s["dict"], list):
      out = {}
      for item in s["dict"]:
        if not (isinstance(item, list) and len(item) == 2 and type(item[0]) in (str, int)):
          raise bad(f"malformed dict item {str(item)[:80]!r}")
        out[item[0]] = dec(item[1])
      return out
    if set(s) == {"namedtuple", "fields"}:
      cls = registry.get(s["namedtuple"]) if isinstance(s["namedtuple"], str) else None
      if cls is None:
        raise bad(f"unknown state class {s['namedtuple']!r} (allowed: {sorted(registry)}; "
                  "register others with compressjax.checkpoint.register_state_class)")
      if not isinstance(s["fields"], list) or len(s["fields"]) != len(cls._fields):
        raise bad(f"{s['namedtuple']} expects {len(cls._fields)} fields")
      return cls(*(dec(v) for v in s["fields"]))
    if set(s) == {"array", "kind", "dtype", "shape"} and s["kind"] in ("numpy", "scalar", "jax"):
      a = arrays.get(s["array"])
      if a is None:
        raise bad(f"array {s['array']!r} is missing")
      if jnp.dtype(a.dtype).name != s["dtype"] or list(a.shape) != s["shape"]:
        raise bad(f"array {s['array']!r} is {a.shape}/{a.dtype}, expected "
                  f"{tuple(s['shape'])}/{s['dtype']}")
      if s["kind"] == "jax":
        return jnp.asarray(a)
      a = np.asarray(a)
      return a[()] if s["kind"] == "scalar" else a
    raise bad(f"unexpected entry {str(s)[:80]!r} (not written by encode_pytree)")

  if not (isinstance(spec, dict) and spec.get("encoding") == _PYTREE_ENCODING
          and set(spec) == {"encoding", "tree"}):
    raise bad(f"not written by encode_pytree (expected a {{'encoding': {_PYTREE_ENCODING!r}, "
              f"'tree': ...}} entry, got {str(spec)[:60]!r}); old pickled states are never "
              "loaded")
  return dec(spec["tree"])


# --------------------------------------------------------------------------------------------
# Restoring.
# --------------------------------------------------------------------------------------------


def read_manifest(path: str) -> dict[str, Any]:
  """The parsed ``manifest.json`` of the checkpoint at ``path`` (format version checked)."""
  mpath = os.path.join(os.path.abspath(path), MANIFEST)
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint path {path!r}: no such directory")
  if not os.path.isfile(mpath):
    raise CheckpointError(f"checkpoint path {path!r}: {MANIFEST} is missing (partial or not a "
                          "compressjax checkpoint)")
  _check_confined(path, [MANIFEST])
  try:
    with open(mpath, encoding="utf-8") as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"checkpoint path {path!r}: {MANIFEST} is corrupted ({e})") from e
  if not isinstance(manifest, dict) or manifest.get("format_version") not in _READABLE_VERSIONS:
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    raise CheckpointError(f"checkpoint path {path!r}: format_version {version!r} is not "
                          f"readable (expected one of {_READABLE_VERSIONS}; version 2 stored "
                          f"3-bit codes as a bitstream and is converted when restored)")
  return manifest


def _check_confined(path: str, names: Sequence[str] | None = None) -> None:
  """Refuses entries of ``path`` (``names``, or every entry below it) whose real path lies
  outside the checkpoint directory (symbolic links pointing elsewhere)."""
  root = os.path.realpath(path)
  if names is not None:
    todo = [os.path.join(path, n) for n in names]
  else:
    todo = []
    for d, dirs, files in os.walk(path):  # does not descend into linked directories
      todo.extend(os.path.join(d, n) for n in dirs + files)
  for full in todo:
    real = os.path.realpath(full)
    if not _is_within(real, root):
      raise CheckpointError(
          f"checkpoint path {path!r}: {os.path.relpath(full, path)!r} resolves to {real!r}, "
          "outside the checkpoint directory (symbolic link); refusing to read it")


def _set(tree: dict, path: str, value):
  keys = path.split("/")
  node = tree
  for k in keys[:-1]:
    k = int(k) if k.isdigit() else k
    node = node.setdefault(k, {})
  last = keys[-1]
  node[int(last) if last.isdigit() else last] = value


def _sharding_children(shardings) -> dict[str, dict[str, Any]]:
  """``{leaf path: {child name: sharding}}`` of a shardings tree shaped like the params."""
  out = {}
  for p, leaf in leaves_with_paths(shardings):
    if isinstance(leaf, CompressedArray):
      children: dict[str, Any] = {}
      _describe_node(leaf, "", children)
      out[p] = children
    else:
      out[p] = {"value": leaf}
  return out


def _arrays_dir(path: str, leaf: str, entry: dict[str, Any]) -> str:
  """The arrays directory of a manifest entry, relative to the checkpoint: ``arrays``, or for a
  checkpoint written block by block the entry's ``part`` (``blocks/<i>``, ``outside/<k>``) +
  ``/arrays``."""
  part = entry.get("part")
  if part is None:
    return "arrays"
  if not isinstance(part, str) or not _PART.fullmatch(part):
    raise CheckpointError(f"checkpoint path {path!r}: leaf {leaf} names part {part!r}; expected "
                          "'blocks/<number>' or 'outside/<number>' (a part of a checkpoint "
                          "written block by block)")
  return f"{part}/arrays"


def restore(path: str, *, shardings: Any = None,
            select: Callable[[str], bool] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """Restores ``(params, metadata)`` saved by :func:`save`, verifying every array's checksum.

  Args:
    path: the checkpoint directory.
    select: optional predicate on a leaf's path (``"layers/3/mlp/down_proj/kernel"``): only the
      leaves it accepts are read and returned (e.g. one block of a model bigger than memory).
    shardings: optional tree shaped like the params with a ``jax.sharding.Sharding`` per array
      (compressed leaves hold one per child, e.g. :func:`compressjax.formats.tree_shardings`);
      those arrays are read straight into that layout, each device's shard from the files (a
      leaf left out of the tree is restored as before). Arrays saved split over devices are
      checksummed per shard.

  Raises:
    CheckpointError: a missing, partial, corrupted or unsafe checkpoint (a file linked from
      outside the directory, a compressed format that is not registered), naming the path; a
      ``shardings`` entry for a leaf the checkpoint does not hold.
  """

  path = os.path.abspath(path)
  manifest = read_manifest(path)
  _check_confined(path)
  placed = {} if shardings is None else _sharding_children(shardings)
  unknown = sorted(set(placed) - set(manifest["leaves"]))
  if unknown:
    raise CheckpointError(f"checkpoint path {path!r}: shardings name leaves it does not hold: "
                          f"{unknown[:4]}")
  for p, children in placed.items():
    extra = sorted(set(children) - set(manifest["leaves"][p]["children"]))
    if extra:
      raise CheckpointError(f"checkpoint path {path!r}: shardings for {p} name arrays {extra} "
                            f"the stored leaf does not have "
                            f"({sorted(manifest['leaves'][p]['children'])}: another format?)")
  if select is not None and not callable(select):
    raise TypeError(f"checkpoint.restore: select must be a callable on leaf paths or None, got "
                    f"{type(select).__name__}")
  leaves = {p: e for p, e in manifest["leaves"].items() if select is None or select(p)}
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  targets: dict[str, dict[str, Any]] = {}  # arrays directory -> orbax target
  if select is None:
    targets["arrays"] = {}  # its presence is checked even when every array is empty
  for p, entry in leaves.items():
    target = targets.setdefault(_arrays_dir(path, p, entry), {})
    for name, spec in entry["children"].items():
      if math.prod(spec["shape"]):
        sh = placed.get(p, {}).get(name)
        if sh is None and isinstance(entry["crc32"][name], dict):
          sh = default  # saved split over devices: orbax needs a target layout
        target[f"a{entry['index']}_{name}"] = jax.ShapeDtypeStruct(
            tuple(spec["shape"]), jnp.dtype(spec["dtype"]), sharding=sh)
  arrays: dict[str, dict[str, Any]] = {}
  for rel, target in targets.items():
    arrays_dir = os.path.join(path, rel)
    if not os.path.isdir(arrays_dir):
      raise CheckpointError(f"checkpoint path {path!r}: {rel}/ is missing (partial checkpoint)")
    try:
      arrays[rel] = (_restore_arrays(arrays_dir, target, partial=select is not None)
                     if target else {})
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(f"checkpoint path {path!r}: arrays could not be restored from "
                            f"{rel}/ ({type(e).__name__}: {e})") from e
  params: dict[str, Any] = {}
  for p, entry in leaves.items():
    rel = _arrays_dir(path, p, entry)
    children = {}
    for name, spec in entry["children"].items():
      key = f"a{entry['index']}_{name}"
      a = (arrays[rel].pop(key) if key in targets[rel]  # popped: its host copy is freed below
           else np.zeros(spec["shape"], jnp.dtype(spec["dtype"])))
      if list(a.shape) != spec["shape"] or jnp.dtype(a.dtype).name != spec["dtype"]:
        raise CheckpointError(f"checkpoint path {path!r}: array {p}/{name} has "
                              f"{a.shape}/{a.dtype}, manifest says {spec}")
      crc = entry["crc32"][name]
      if isinstance(crc, dict):
        shards = crc.get("shards")
        if not isinstance(shards, dict) or not shards:
          raise CheckpointError(f"checkpoint path {path!r}: array {p}/{name} has no per-shard "
                                f"checksums in its manifest entry ({crc!r})")
        _check_shards(a, shards, f"checkpoint path {path!r}: array {p}/{name}")
      elif _crc(a) != crc:
        raise CheckpointError(f"checkpoint path {path!r}: array {p}/{name} fails its checksum "
                              "(corrupted checkpoint)")
      j = jnp.asarray(a)
      # Without jax_enable_x64 a 64-bit array would silently become 32-bit: keep it in numpy.
      children[name] = j if j.dtype == a.dtype else np.asarray(a)
    if entry["kind"] == "dense":
      leaf = children["value"]
    else:
      leaf = _build_node(entry["tree"], children, path, manifest["format_version"])
    _set(params, p, leaf)
  return params, manifest["metadata"]
