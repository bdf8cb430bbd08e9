"""torch.library registrations: one module per op, holding its custom ops, their fake
functions and their autograd. No kernel code lives here; launchers come from the backend
named in each call (see ``fastattn.backends.launcher``)."""
