"""Integrations with other libraries. Each lives in its own module and imports its library only
when its ``register()`` is called, so importing fastattn never imports them."""
