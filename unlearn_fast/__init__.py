"""unlearn_fast: fused kernels and end-to-end methods for machine unlearning of
multimodal models (SIU, MMUnlearner, MultiDelete and the GA/NPO family)."""
from unlearn_fast.backends import BackendUnavailableError
from unlearn_fast.memory import cpu_buffer_cache_info, empty_cpu_buffer_cache, set_cpu_buffer_cache_limit
from unlearn_fast.ops.dual_masked_kl import DualMaskedKLDivLoss, build_vocab_mask, dual_masked_kl
from unlearn_fast.ops.fused_linear import FusedLinearDualMaskedKLDivLoss, fused_linear_dual_masked_kl
from unlearn_fast.ops.losses import (CrossEntropyLoss, GradientAscentLoss, LinearCrossEntropyLoss, NPOLoss,
                                     SimNPOLoss, cross_entropy, cross_entropy_from_logits, gradient_ascent,
                                     gradient_ascent_from_logits, npo, sequence_logprob, simnpo)
from unlearn_fast.ops.modality import (ModalityDecouplingLoss, SimilarityMatchingLoss, derangement,
                                       modality_decoupling_loss, shuffle_without_fixed_points,
                                       similarity_matching_loss)
from unlearn_fast.ops.token_stats import token_stats, token_stats_from_logits
from unlearn_fast import saliency  # noqa: E402  (MMUnlearner / SalUn masks and gradient transforms)
from unlearn_fast.saliency import (BitMask, FisherAccumulator, mmunlearner_mask, ratio_mask, salun_reset_, topk_mask,
                                   topk_mask_distributed, transform_gradients_)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "cpu_buffer_cache_info", "empty_cpu_buffer_cache", "set_cpu_buffer_cache_limit",
    "DualMaskedKLDivLoss",
    "dual_masked_kl", "build_vocab_mask",
    "fused_linear_dual_masked_kl", "FusedLinearDualMaskedKLDivLoss",
    "token_stats", "token_stats_from_logits", "cross_entropy", "cross_entropy_from_logits", "gradient_ascent",
    "gradient_ascent_from_logits", "sequence_logprob", "npo", "simnpo", "CrossEntropyLoss", "LinearCrossEntropyLoss",
    "GradientAscentLoss", "NPOLoss", "SimNPOLoss",
    "modality_decoupling_loss", "similarity_matching_loss", "derangement", "shuffle_without_fixed_points",
    "ModalityDecouplingLoss", "SimilarityMatchingLoss",
    "saliency", "BitMask", "FisherAccumulator", "mmunlearner_mask", "ratio_mask", "salun_reset_", "topk_mask",
    "topk_mask_distributed", "transform_gradients_",
]
