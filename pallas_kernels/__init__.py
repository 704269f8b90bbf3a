"""Pallas kernels for packed low-bit weights, each beside its pure-jnp reference.

No kernel is registered yet: every compressed matmul uses the pure-jnp ("xla") implementation of
:func:`compressjax.formats.dot`. Kernels will register themselves there as extra implementations.
"""

__all__: list[str] = []
