"""Atomic, verified orbax checkpoints of (possibly compressed) parameter trees.

Layout of a checkpoint directory::

    manifest.json   format version, per-leaf description (dense, or a compressed format's class,
                    static metadata and children), per-array CRC32, user metadata
    arrays/         orbax StandardCheckpointer save of a flat {leaf_key: array} dict
    tokenizer.json  (optional) the tokenizer, so a checkpoint is self-contained

The directory is written under a temporary sibling name and renamed into place only once
everything (orbax included) is finished, so an interrupted save leaves nothing at ``path``.
Restoring checks the manifest, the arrays' shapes and dtypes and their checksums, and raises
:class:`CheckpointError` naming the path and what was wrong.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import tempfile
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import CompressedArray
from compressjax.transforms.selection import leaves_with_paths

__all__ = ["CheckpointError", "save", "restore", "read_manifest"]

FORMAT_VERSION = 2  # 2: nested compressed leaves ("tree" entries)
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
  """A checkpoint is missing, partial, corrupted or of an unknown format."""


def _crc(x) -> int:
  return zlib.crc32(np.ascontiguousarray(np.asarray(x)).view(np.uint8).ravel().tobytes())


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
    static, fields = {}, {}
    for f in dataclasses.fields(node):
      v = getattr(node, f.name)
      if f.metadata.get("static"):
        static[f.name] = _encode_static(v)
      else:
        fields[f.name] = _describe_node(v, f.name if not name else f"{name}.{f.name}", children)
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "static": static, "fields": fields}
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


def _build_node(spec, children: dict[str, Any], path: str):
  if spec is None:
    return None
  if "array" in spec:
    return children[spec["array"]]
  if "tuple" in spec:
    return tuple(_build_node(s, children, path) for s in spec["tuple"])
  cls = _resolve_class(spec["class"], path)
  static = {k: _decode_static(v) for k, v in spec["static"].items()}
  fields = {k: _build_node(v, children, path) for k, v in spec["fields"].items()}
  return cls(**fields, **static)


def save(path: str, params: Any, *, metadata: dict[str, Any] | None = None,
         tokenizer=None, overwrite: bool = False) -> str:
  """Saves ``params`` (nested dict; dense and compressed leaves) atomically to ``path``.

  Args:
    path: target directory (made absolute; orbax needs absolute paths).
    params: the parameter tree.
    metadata: JSON-serializable extras (model config, recipe, results).
    tokenizer: optional ``tokenizers.Tokenizer`` saved as ``tokenizer.json``.
    overwrite: replace an existing checkpoint at ``path``.

  Returns:
    The absolute path written.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"checkpoint path {path!r} already exists (pass overwrite=True)")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  leaves: dict[str, Any] = {}
  arrays: dict[str, Any] = {}
  for i, (p, leaf) in enumerate(leaves_with_paths(params)):
    entry, children = _describe(leaf)
    entry["index"] = i
    entry["crc32"] = {}
    for name, v in children.items():
      key = f"a{i}_{name}"
      arrays[key] = np.asarray(v)
      entry["crc32"][name] = _crc(arrays[key])
    leaves[p] = entry
  manifest = {"format_version": FORMAT_VERSION, "leaves": leaves, "metadata": metadata or {}}
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, "arrays"), arrays)
    ckptr.wait_until_finished()
    if tokenizer is not None:
      tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    if os.path.exists(path):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
      os.replace(path, os.path.join(old, "x"))
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def read_manifest(path: str) -> dict[str, Any]:
  mpath = os.path.join(os.path.abspath(path), MANIFEST)
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint path {path!r}: no such directory")
  if not os.path.isfile(mpath):
    raise CheckpointError(f"checkpoint path {path!r}: {MANIFEST} is missing (partial or not a "
                          "compressjax checkpoint)")
  try:
    with open(mpath) as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"checkpoint path {path!r}: {MANIFEST} is corrupted ({e})") from e
  if manifest.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(f"checkpoint path {path!r}: format_version "
                          f"{manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
  return manifest


def _resolve_class(spec: str, path: str):
  mod, _, qual = spec.partition(":")
  try:
    obj = importlib.import_module(mod)
    for part in qual.split("."):
      obj = getattr(obj, part)
  except (ImportError, AttributeError) as e:
    raise CheckpointError(f"checkpoint path {path!r}: unknown compressed format {spec!r}") from e
  if not (isinstance(obj, type) and issubclass(obj, CompressedArray)):
    raise CheckpointError(f"checkpoint path {path!r}: {spec!r} is not a compressed format")
  return obj


def _set(tree: dict, path: str, value):
  keys = path.split("/")
  node = tree
  for k in keys[:-1]:
    k = int(k) if k.isdigit() else k
    node = node.setdefault(k, {})
  last = keys[-1]
  node[int(last) if last.isdigit() else last] = value


def restore(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Restores ``(params, metadata)`` saved by :func:`save`, verifying every array's checksum."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(path)
  manifest = read_manifest(path)
  target = {}
  for p, entry in manifest["leaves"].items():
    for name, spec in entry["children"].items():
      target[f"a{entry['index']}_{name}"] = jax.ShapeDtypeStruct(tuple(spec["shape"]),
                                                                jnp.dtype(spec["dtype"]))
  arrays_dir = os.path.join(path, "arrays")
  if not os.path.isdir(arrays_dir):
    raise CheckpointError(f"checkpoint path {path!r}: arrays/ is missing (partial checkpoint)")
  try:
    arrays = ocp.StandardCheckpointer().restore(arrays_dir, target)
  except Exception as e:  # orbax raises many types for damaged files
    raise CheckpointError(f"checkpoint path {path!r}: arrays could not be restored "
                          f"({type(e).__name__}: {e})") from e
  params: dict[str, Any] = {}
  for p, entry in manifest["leaves"].items():
    children = {}
    for name, spec in entry["children"].items():
      a = arrays[f"a{entry['index']}_{name}"]
      if list(a.shape) != spec["shape"] or jnp.dtype(a.dtype).name != spec["dtype"]:
        raise CheckpointError(f"checkpoint path {path!r}: array {p}/{name} has "
                              f"{a.shape}/{a.dtype}, manifest says {spec}")
      if _crc(a) != entry["crc32"][name]:
        raise CheckpointError(f"checkpoint path {path!r}: array {p}/{name} fails its checksum "
                              "(corrupted checkpoint)")
      children[name] = jnp.asarray(a)
    if entry["kind"] == "dense":
      leaf = children["value"]
    else:
      leaf = _build_node(entry["tree"], children, path)
    _set(params, p, leaf)
  return params, manifest["metadata"]
