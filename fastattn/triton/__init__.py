"""Triton kernels and their launchers, one module per op. Imported only when the ``triton``
backend is chosen for a call, never by ``import fastattn``."""
