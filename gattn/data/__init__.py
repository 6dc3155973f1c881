"""Data layer: the generated global-context benchmark, folder, COCO detection and torchvision
data sets, and training views."""

from gattn.data.coco import AnnotationError, CocoImage, CocoSet, coco_dict, read_coco
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
from gattn.data.detection import (
    DET_LAYOUT,
    CocoDetectionDataset,
    DetTarget,
    collate_detection,
)
from gattn.data.images import as_path, open_file, open_image, oriented_size, to_mode
from gattn.data.pathfinder import PathfinderConfig, pathfinder_sample, render_paths
from gattn.data.synthetic import (
    ANNOTATIONS,
    TASKS,
    ManifestError,
    generate,
    make_config,
    read_manifest,
    synthetic_sample,
    verify_manifest,
)
from gattn.data.tiny_det import TinyDetConfig, tiny_det_sample
from gattn.data.torchvision_sets import TRAIN_TEST, TorchvisionDataset, unpack_gzipped
from gattn.data.views import (
    MultiCropViews,
    MultiScaleViews,
    det_train_transform,
    mae_view,
    seg_eval_transform,
    seg_train_transform,
    to_float,
)

__all__ = [
    "ANNOTATIONS",
    "CUE_PALETTE",
    "DET_LAYOUT",
    "IGNORE_INDEX",
    "IMG_EXTENSIONS",
    "TASKS",
    "TRAIN_TEST",
    "AnnotationError",
    "CocoDetectionDataset",
    "CocoImage",
    "CocoSet",
    "CueSegConfig",
    "DataLayoutError",
    "DetTarget",
    "ImageFolderDataset",
    "ManifestError",
    "MultiCropViews",
    "MultiScaleViews",
    "PathfinderConfig",
    "SegmentationFolderDataset",
    "SyntheticDataset",
    "TinyDetConfig",
    "TorchvisionDataset",
    "as_path",
    "coco_dict",
    "collate_detection",
    "cue_seg_sample",
    "det_train_transform",
    "generate",
    "infer_num_classes",
    "mae_view",
    "make_config",
    "open_file",
    "open_image",
    "oriented_size",
    "pathfinder_sample",
    "read_coco",
    "read_manifest",
    "render_paths",
    "seg_eval_transform",
    "seg_train_transform",
    "synthetic_sample",
    "tiny_det_sample",
    "to_float",
    "to_mode",
    "unpack_gzipped",
    "verify_manifest",
]
