"""Shared fixtures: the real data in ../shared/data, offline hub, a fixed console width."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

import cxrtool  # noqa: F401  (first: makes torchvision importable for the test modules that import grad-cam or timm)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COLUMNS", "200")  # rich: no wrapping in asserted output
os.environ.setdefault("CXRTOOL_NO_PROGRESS", "1")
# Exported ONNX graphs of the tests' throwaway checkpoints stay out of the user's cache.
os.environ.setdefault("CXRTOOL_CACHE", tempfile.mkdtemp(prefix="cxrtool-test-cache-"))

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


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """A function writing a small random ResNet-18 checkpoint (64 px input) with given findings."""
    made: dict[tuple, Path] = {}

    def make(findings: tuple[str, ...] = ("Effusion", "Nodule", "Cardiomegaly"), *, name: str = "tiny", seed: int = 0,
             thresholds: dict[str, float] | None = None) -> Path:
        key = (tuple(findings), name, seed, tuple(sorted((thresholds or {}).items())))
        if key not in made:
            import torch

            from cxrtool.models.checkpoint import ModelCard, save_checkpoint
            from cxrtool.models.network import CXRClassifier
            from cxrtool.preprocess import Preprocessing

            torch.manual_seed(seed)
            model = CXRClassifier("resnet18", list(findings))
            card = ModelCard("resnet18", list(findings), Preprocessing(input_size=64).to_dict(), name=name,
                             thresholds=dict(thresholds or {}))
            folder = tmp_path_factory.mktemp("checkpoints")
            made[key] = save_checkpoint(folder / f"{name}.safetensors", model, card)
        return made[key]

    return make
