"""Reading compressed leaves stored in an older code layout (:data:`packing.LAYOUT_VERSION`).

Layout 1 (checkpoint ``format_version`` 2 and older) stored 3-bit codes as a straddling
bitstream; layout 2 packs them 10 per ``uint32`` (:mod:`compressjax.formats.packing`). Every
format that packs 3-bit codes names here which child holds them and how many codes it packs, so
:func:`upgrade_fields` can repack a restored leaf's children before its constructor validates
them. Other widths did not change (their children are returned as they are).

References:
  :mod:`compressjax.formats.packing` (both layouts).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compressjax.formats import packing

__all__ = ["stream_children", "upgrade_fields"]


def _shape0(child: Any) -> int | None:
  shape = getattr(child, "shape", None)
  return int(shape[0]) if shape is not None and len(shape) else None


def stream_children(cls: type, static: dict[str, Any],
                    fields: dict[str, Any]) -> list[tuple[str, int, int]]:
  """``[(field, bits, codes)]``: the children of a ``cls`` leaf whose codes were packed along
  axis 0 in a layout that changed (3-bit codes), with their bit width and number of codes.

  ``static`` and ``fields`` are the leaf's static metadata and children by name, as a checkpoint
  manifest describes them (children may be arrays or already built leaves).
  """
  # pylint: disable=g-import-not-at-top
  from compressjax.formats import additive, quantized, sparse, vq
  changed = packing.PER_WORD_BITS
  shape = static.get("shape")
  out = []
  if issubclass(cls, quantized.QuantizedArray) and static.get("bits") in changed:
    out.append(("packed", static["bits"], shape[0]))
  elif issubclass(cls, sparse.BitmaskSparse) and static.get("bits") in changed:
    out.append(("values", static["bits"], static["nnz"]))
  elif issubclass(cls, sparse.NMSparse) and sparse.index_bits(static["m"]) in changed:
    out.append(("indices", sparse.index_bits(static["m"]), shape[0] * static["n"] // static["m"]))
  elif (issubclass(cls, vq.VQArray) and static.get("code_bits") in changed
        and vq.code_container(static["code_bits"]) == "packed"):
    out.append(("codes", static["code_bits"], shape[0] // static["dim"]))
  elif (issubclass(cls, additive.AdditiveCodebookArray) and static.get("nbits") in changed
        and additive.code_container(static["nbits"]) == "packed"):
    g = int(np.shape(fields["codebooks"])[2])
    out.append(("codes", static["nbits"], shape[0] // g))
  return out


def upgrade_fields(cls: type, static: dict[str, Any], fields: dict[str, Any], *,
                   layout: int, where: str = "leaf") -> dict[str, Any]:
  """``fields`` of a ``cls`` leaf stored in code ``layout`` with its packed codes repacked in
  the current layout (:data:`packing.LAYOUT_VERSION`).

  Raises:
    ValueError: a child does not have the word count of the stored layout (naming ``where``,
      the field, and the expected and found shapes), or ``layout`` is unknown.
  """
  if layout == packing.LAYOUT_VERSION:
    return fields
  if layout != 1:
    raise ValueError(f"{where}: code layout {layout!r} is unknown (this compressjax reads "
                     f"layouts 1 and {packing.LAYOUT_VERSION})")
  fields = dict(fields)
  for name, bits, length in stream_children(cls, static, fields):
    child = fields[name]
    want = packing.stream_length(length, bits)
    if _shape0(child) != want:
      raise ValueError(f"{where}.{name}: a layout-1 {bits}-bit bitstream of {length} codes has "
                       f"{want} words along axis 0, got shape {np.shape(child)}")
    fields[name] = packing.restream(child, bits, length, axis=0)
  return fields
