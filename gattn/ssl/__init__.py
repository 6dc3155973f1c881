"""Self-supervised objectives: MAE, DINO and the global-local consistency loss.

References:
    He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022.
    Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.
    van den Oord et al., "Representation Learning with Contrastive Predictive Coding", 2018.
"""

from gattn.ssl.consistency import GlobalLocalConsistencyLoss, global_local_infonce
from gattn.ssl.dino import DINO, DINOHead, MultiCropWrapper, dino_param_groups, momentum_schedule
from gattn.ssl.dino_loss import DINOLoss, collapse_stats
from gattn.ssl.mae import (
    MaskedAutoencoder,
    masked_mse,
    normalize_patches,
    patchify,
    random_masking,
    unpatchify,
)
from gattn.ssl.reconstruction import reconstruct, reconstruction_figure
from gattn.ssl.schedules import schedule_values, warmup_cosine

__all__ = [
    "DINO",
    "DINOHead",
    "DINOLoss",
    "GlobalLocalConsistencyLoss",
    "MaskedAutoencoder",
    "MultiCropWrapper",
    "collapse_stats",
    "dino_param_groups",
    "global_local_infonce",
    "masked_mse",
    "momentum_schedule",
    "normalize_patches",
    "patchify",
    "random_masking",
    "reconstruct",
    "reconstruction_figure",
    "schedule_values",
    "unpatchify",
    "warmup_cosine",
]
