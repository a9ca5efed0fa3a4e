"""Helpers for tests that use real DICOM tools (DCMTK, dicom3tools).

A missing tool fails the test with a message naming the Debian package; it never skips.
"""

from __future__ import annotations

import os
import shutil
import sys
import subprocess
from pathlib import Path

import pytest

PACKAGES = {
    "dciodvfy": "dicom3tools",
    "dcmcjpls": "dcmtk",
    "dcmcrle": "dcmtk",
    "dcmcjpeg": "dcmtk",
    "storescu": "dcmtk",
    "storescp": "dcmtk",
    "findscu": "dcmtk",
    "getscu": "dcmtk",
    "movescu": "dcmtk",
    "echoscu": "dcmtk",
    "Orthanc": "orthanc",
}


def require(tool: str) -> str:
    """Path of ``tool``; fails the test (never skips) when it is not installed.

    The virtualenv's own bin folder is left out of the search: pynetdicom installs
    Python look-alikes named ``storescu``, ``findscu``... there, and the tests mean DCMTK's.
    """
    venv_bin = Path(sys.executable).parent.resolve()
    search = os.pathsep.join(
        entry for entry in os.environ.get("PATH", os.defpath).split(os.pathsep)
        if entry and Path(entry).resolve() != venv_bin
    )
    path = shutil.which(tool, path=search)
    if path is None:
        pytest.fail(f"{tool} is required: apt-get install {PACKAGES.get(tool, tool)}")
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy reports for a DICOM file (PS3.3 IOD validation)."""
    result = subprocess.run(
        [require("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    return [line for line in output.splitlines() if line.startswith("Error")]
