"""Training of latentpacs models on DICOM folders.

The chain reads top to bottom: :mod:`.data` finds and decodes images,
:mod:`.split` holds patients out for validation, :mod:`.loop` trains, checkpoints
(:mod:`.checkpoint`), measures (:mod:`.evaluation`) and exports a model file + card.
"""

from latentpacs.train.data import CachedImageDataset, ImageRecord, scan_dicom_folders
from latentpacs.train.loop import TrainConfig, TrainResult, train
from latentpacs.train.split import split_by_patient

__all__ = [
    "CachedImageDataset",
    "ImageRecord",
    "TrainConfig",
    "TrainResult",
    "scan_dicom_folders",
    "split_by_patient",
    "train",
]
