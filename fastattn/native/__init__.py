"""The ``native`` backend's launchers: thin adapters from the launcher signatures every backend
shares (see ``fastattn.reference``) to the C++ ops ``torch.ops.fastattn.native_*`` of the
compiled extension (``csrc/``, loaded by ``fastattn._ext``). One module per op, as
``fastattn.triton``, so ``fastattn.backends.launcher`` finds them by name."""
