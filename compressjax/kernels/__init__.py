"""Native kernels for compressed weights (``compressjax.kernels.cpu``: XLA FFI custom calls)."""
