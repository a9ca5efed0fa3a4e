"""Training / validation / test split by patient, so no patient's images appear on two sides.

The unit of the split is Patient ID (0010,0020, PS3.3 C.7.1.1): a patient's left and
right, CC and MLO views are strongly correlated, so splitting images instead of patients
would leak training data into validation or test. The split is a seeded shuffle of the
sorted patient IDs; the same records and seed always give the same split.

The three sets have three jobs: the training set trains, the validation set chooses the
checkpoint (the epoch of lowest validation loss), and the test set is held out from both
and only measured once, at the end, so the figure a model card reports was not used to
choose anything.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from latentpacs.errors import ConfigError
from latentpacs.train.data import ImageRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatientSplit:
    """Images split into training, validation (chooses the epoch) and held-out test sets.

    Attributes
    ----------
    train, validation, test:
        Records in their input order; no image is in two sets.
    """

    train: tuple[ImageRecord, ...]
    validation: tuple[ImageRecord, ...]
    test: tuple[ImageRecord, ...]

    @property
    def patients(self) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
        """The Patient IDs of the training, validation and test sets."""
        def ids(side: tuple[ImageRecord, ...]) -> frozenset[str]:
            return frozenset(record.patient_id for record in side)

        return ids(self.train), ids(self.validation), ids(self.test)


def _check_fraction(value: float, what: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{what} fraction must be in [0, 1), got {value}")


def split_train_val_test(
    records: Sequence[ImageRecord],
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> PatientSplit:
    """Split images into training, validation and test sets by Patient ID (0010,0020).

    Parameters
    ----------
    records:
        The images; their order does not change the split.
    val_fraction, test_fraction:
        Shares of *patients* held out for validation and for the test, each in [0, 1),
        together below 1. A positive fraction holds out at least one patient when there
        are enough: validation needs two patients (one stays for training), the test
        needs three (one each for training and validation); at least one patient always
        stays for training. With a single patient everything is training data.
    seed:
        Seed of the shuffle of patient IDs. The test patients are taken first, then the
        validation patients, so ``test_fraction=0`` gives the same validation set as
        :func:`split_by_patient`.

    Returns
    -------
    PatientSplit
        No patient in two sets.

    Raises
    ------
    ConfigError
        A fraction outside [0, 1), or both together 1 or more.
    """
    _check_fraction(val_fraction, "validation")
    _check_fraction(test_fraction, "test")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"validation and test fractions together must be below 1, got "
                          f"{val_fraction} + {test_fraction}")
    patients = sorted({record.patient_id for record in records})
    random.Random(seed).shuffle(patients)
    n = len(patients)
    want_val, want_test = val_fraction > 0.0 and n >= 2, test_fraction > 0.0 and n >= 3
    n_val = max(round(n * val_fraction), 1) if want_val else 0
    n_test = max(round(n * test_fraction), 1) if want_test else 0
    n_test = min(n_test, max(n - 1 - int(want_val), 0))
    n_val = min(n_val, n - 1 - n_test) if n else 0
    test_ids = frozenset(patients[:n_test])
    val_ids = frozenset(patients[n_test:n_test + n_val])
    split = PatientSplit(
        train=tuple(r for r in records if r.patient_id not in test_ids | val_ids),
        validation=tuple(r for r in records if r.patient_id in val_ids),
        test=tuple(r for r in records if r.patient_id in test_ids),
    )
    logger.info(
        "split %d patients: %d for training (%d images), %d for validation (%d images), %d for test (%d images)",
        n, n - n_val - n_test, len(split.train), n_val, len(split.validation), n_test, len(split.test),
    )
    return split


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
    split = split_train_val_test(records, val_fraction=val_fraction, test_fraction=0.0, seed=seed)
    return list(split.train), list(split.validation)
