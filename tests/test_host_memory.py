"""host_memory.release_free_memory: freed heap memory goes back to the system (Linux + glibc,
what CI runs on)."""

import sys

import numpy as np
import pytest

from compressjax import host_memory


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim is Linux's")
def test_freed_heap_memory_is_returned():
  # 240 MB in 60 KB arrays (below glibc's mmap threshold: they live in the heap); the last one
  # stays alive, so the freed space below it is not at the heap's top and is kept by malloc.
  arrays = [np.ones(60 * 1024 // 8) for _ in range(4096)]
  keep = np.ones(60 * 1024 // 8)
  host_memory.release_free_memory()
  full = _rss_mb()
  del arrays
  kept = _rss_mb()
  assert host_memory.release_free_memory() is True
  trimmed = _rss_mb()
  assert kept > full - 60, (full, kept)  # malloc kept (most of) it
  assert trimmed < kept - 150, (full, kept, trimmed)  # returned to the system
  assert keep.sum() == keep.size  # untouched
