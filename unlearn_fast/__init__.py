"""unlearn_fast: fused kernels and end-to-end methods for machine unlearning of
multimodal models (SIU, MMUnlearner, MultiDelete and the GA/NPO family)."""
from unlearn_fast.backends import BackendUnavailableError
from unlearn_fast.ops.dual_masked_kl import DualMaskedKLDivLoss, dual_masked_kl

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DualMaskedKLDivLoss",
    "dual_masked_kl",
]
