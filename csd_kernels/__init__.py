"""Fused kernels for Concrete Score Distillation (Kim et al. 2025, arXiv 2509.25837).

Importing this package imports torch only: Triton is imported when a Triton kernel is first used.
"""

from .fused_linear import fused_linear_csd_loss
from .kernels.inductor_backend import empty_cache
from .loss import CSDLoss, KLLoss, csd_loss, kl_loss
from .topk import teacher_topk, topk_csd_loss, topk_kl_loss

__all__ = ["csd_loss", "CSDLoss", "kl_loss", "KLLoss", "fused_linear_csd_loss", "topk_csd_loss", "topk_kl_loss",
           "teacher_topk", "empty_cache"]
__version__ = "0.1.0"
