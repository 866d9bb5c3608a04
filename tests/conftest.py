"""Shared fixtures: the real data in ../shared/data, offline hub, a fixed console width."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COLUMNS", "200")  # rich: no wrapping in asserted output
os.environ.setdefault("CXRTOOL_NO_PROGRESS", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real NIH and DICOM data; tests using it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def nih_dir(shared_data: Path) -> Path:
    folder = shared_data / "nih"
    if not (folder / "images").is_dir():
        pytest.skip(f"NIH images not found in {folder}")
    return folder


@pytest.fixture(scope="session")
def dicom_dir(shared_data: Path) -> Path:
    folder = shared_data / "dicom"
    if not folder.is_dir():
        pytest.skip(f"DICOM data not found in {folder}")
    return folder
