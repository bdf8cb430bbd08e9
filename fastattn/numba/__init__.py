"""The ``numba`` backend: CPU kernels compiled by Numba at first use (no build step), one module
per op as in ``fastattn.triton`` so ``fastattn.backends.launcher`` finds them by name;
``common`` holds the pieces they share (a vectorisable exp, NaN-safe max, the dropout hash,
torch <-> numpy adapters)."""
