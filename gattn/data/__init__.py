"""Data layer: the generated global-context benchmark, folder and torchvision data sets, and
training views."""

from gattn.data.cue_seg import CUE_PALETTE, CueSegConfig, cue_seg_sample
from gattn.data.datasets import (
    IGNORE_INDEX,
    IMG_EXTENSIONS,
    DataLayoutError,
    ImageFolderDataset,
    SegmentationFolderDataset,
    SyntheticDataset,
    infer_num_classes,
)
from gattn.data.images import as_path, open_file, open_image, oriented_size, to_mode
from gattn.data.pathfinder import PathfinderConfig, pathfinder_sample, render_paths
from gattn.data.synthetic import (
    TASKS,
    ManifestError,
    generate,
    make_config,
    read_manifest,
    synthetic_sample,
    verify_manifest,
)
from gattn.data.torchvision_sets import TRAIN_TEST, TorchvisionDataset, unpack_gzipped
from gattn.data.views import (
    MultiCropViews,
    MultiScaleViews,
    mae_view,
    seg_eval_transform,
    seg_train_transform,
    to_float,
)

__all__ = [
    "CUE_PALETTE",
    "IGNORE_INDEX",
    "IMG_EXTENSIONS",
    "TASKS",
    "TRAIN_TEST",
    "CueSegConfig",
    "DataLayoutError",
    "ImageFolderDataset",
    "ManifestError",
    "MultiCropViews",
    "MultiScaleViews",
    "PathfinderConfig",
    "SegmentationFolderDataset",
    "SyntheticDataset",
    "TorchvisionDataset",
    "as_path",
    "cue_seg_sample",
    "generate",
    "infer_num_classes",
    "mae_view",
    "make_config",
    "open_file",
    "open_image",
    "oriented_size",
    "pathfinder_sample",
    "read_manifest",
    "render_paths",
    "seg_eval_transform",
    "seg_train_transform",
    "synthetic_sample",
    "to_float",
    "to_mode",
    "unpack_gzipped",
    "verify_manifest",
]
