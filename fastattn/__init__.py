"""fastattn: fused attention, softmax and cross-entropy kernels for PyTorch.

Importing fastattn registers its ``torch.library`` ops and nothing else: no device queries, no
kernel compilation, no prints.
"""

from fastattn import nn
from fastattn.backends import (
    BackendUnavailableError,
    available_backends,
    backend_status,
    use_backend,
)
from fastattn.functional import (
    cross_entropy,
    flash_attn_func,
    log_softmax,
    scaled_dot_product_attention,
    softmax,
)
from fastattn.nn import swap

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "backend_status",
    "cross_entropy",
    "flash_attn_func",
    "log_softmax",
    "nn",
    "scaled_dot_product_attention",
    "softmax",
    "swap",
    "use_backend",
]
