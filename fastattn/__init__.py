"""fastattn: fused attention, softmax and cross-entropy kernels for PyTorch.

Importing fastattn registers its ``torch.library`` ops and nothing else: no device queries, no
kernel compilation, no prints.
"""

from fastattn import nn
from fastattn.backends import (
    BackendUnavailableError,
    TunedTableWarning,
    available_backends,
    backend_status,
    explain,
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
    "TunedTableWarning",
    "available_backends",
    "backend_status",
    "cross_entropy",
    "explain",
    "flash_attn_func",
    "log_softmax",
    "nn",
    "scaled_dot_product_attention",
    "softmax",
    "swap",
    "use_backend",
]
