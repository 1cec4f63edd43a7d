"""The executable specification: plain, readable PyTorch with the public signatures.

Every fast path in `csd_kernels` is tested against these functions.
"""

from .csd import csd_loss, csd_loss_authors, csd_loss_pairwise
from .kl import kl_loss
from .topk import teacher_topk, topk_csd_loss, topk_kl_loss

__all__ = ["csd_loss", "csd_loss_pairwise", "csd_loss_authors", "kl_loss", "topk_csd_loss", "topk_kl_loss",
           "teacher_topk"]
