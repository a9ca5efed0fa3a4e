"""Training of latentpacs models on DICOM folders.

The chain reads top to bottom: :mod:`.data` finds and decodes images,
:mod:`.split` holds patients out for validation and for the test, :mod:`.loop` trains, checkpoints
(:mod:`.checkpoint`), measures (:mod:`.evaluation`) and exports a model file + card.
:mod:`.cbis` selects CBIS-DDSM full mammograms from its CSVs and finds them in a download.
"""

from latentpacs.train.cbis import CbisImage, CbisSelection, select_cbis
from latentpacs.train.data import CachedImageDataset, ImageRecord, scan_dicom_folders
from latentpacs.train.loop import TrainConfig, TrainResult, train
from latentpacs.train.split import PatientSplit, split_by_patient, split_train_val_test

__all__ = [
    "CbisImage",
    "CbisSelection",
    "CachedImageDataset",
    "ImageRecord",
    "PatientSplit",
    "TrainConfig",
    "TrainResult",
    "scan_dicom_folders",
    "select_cbis",
    "split_by_patient",
    "split_train_val_test",
    "train",
]
