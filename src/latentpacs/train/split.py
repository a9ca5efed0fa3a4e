"""Train/validation split by patient, so no patient's images appear on both sides.

The unit of the split is Patient ID (0010,0020, PS3.3 C.7.1.1): a patient's left and
right, CC and MLO views are strongly correlated, so splitting images instead of patients
would leak training data into validation. The split is a seeded shuffle of the sorted
patient IDs; the same records and seed always give the same split.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from latentpacs.errors import ConfigError
from latentpacs.train.data import ImageRecord

logger = logging.getLogger(__name__)


def split_by_patient(
    records: Sequence[ImageRecord],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split images into training and validation sets by Patient ID (0010,0020).

    Parameters
    ----------
    records:
        The images; their order does not change the split.
    val_fraction:
        Share of *patients* held out for validation, in [0, 1). With two or more
        patients and a positive fraction at least one patient is held out and at least
        one kept for training; with a single patient everything is training data and
        the validation set is empty.
    seed:
        Seed of the shuffle of patient IDs.

    Returns
    -------
    train, validation:
        Records in their input order, no patient in both.

    Raises
    ------
    ConfigError
        ``val_fraction`` outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"validation fraction must be in [0, 1), got {val_fraction}")
    patients = sorted({record.patient_id for record in records})
    random.Random(seed).shuffle(patients)
    n_val = round(len(patients) * val_fraction)
    if val_fraction > 0.0 and len(patients) >= 2:
        n_val = min(max(n_val, 1), len(patients) - 1)
    else:
        n_val = 0
    held_out = frozenset(patients[:n_val])
    train = [record for record in records if record.patient_id not in held_out]
    validation = [record for record in records if record.patient_id in held_out]
    logger.info(
        "split %d patients: %d for training (%d images), %d for validation (%d images)",
        len(patients), len(patients) - n_val, len(train), n_val, len(validation),
    )
    return train, validation
