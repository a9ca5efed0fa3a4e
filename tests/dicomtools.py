"""Helpers for tests that use real DICOM tools (DCMTK, dicom3tools).

A missing tool fails the test with a message naming the Debian package; it never skips.
"""

from __future__ import annotations

import shutil
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
    """Path of ``tool``; fails the test (never skips) when it is not installed."""
    path = shutil.which(tool)
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
