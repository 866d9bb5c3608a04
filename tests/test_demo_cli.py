"""The demo end to end (phantoms -> train -> predict DICOMs -> evaluate), the CLI surface."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cxrtool.cli import app
from cxrtool.explain.chest import region_doubt
from cxrtool.io.records import Region
from cxrtool.registry import DEFAULT_CAM_METHOD

runner = CliRunner()


@pytest.mark.slow
def test_demo_runs_end_to_end_on_phantoms(tmp_path):
    out = tmp_path / "demo"
    # 64 px: a one-epoch model's maps break into many small regions, each measured by
    # radiomics (at the demo's 128 px, 4,333 for these 24 studies: minutes of PyRadiomics)
    result = runner.invoke(app, ["demo", "--out", str(out), "--train-images", "120", "--test-images", "24",
                                 "--epochs", "1", "--workers", "0", "--input-size", "64"])
    assert result.exit_code == 0, result.output
    assert "held-out mean AUROC" in result.output
    study = out / "study" / "images"
    dicoms = sorted(study.glob("*.dcm"))
    assert len(dicoms) == 24
    assert all((study / f"{d.name}.cxrtool.json").is_file() for d in dicoms)
    (sidecar,) = json.loads((study / f"{dicoms[0].name}.cxrtool.json").read_text())["results"]  # one model's result
    assert set(sidecar["findings"]) >= {"Cardiomegaly", "Effusion", "Nodule", "Mass", "Pneumothorax"}
    assert "PHANTOM" not in (study / "cxrtool_predictions.csv").read_text()  # no patient IDs leak
    report = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert report["matching"]["matched"] == 24
    # the held-out studies are explained, and localization is scored against the phantoms' boxes
    assert "pointing game" in result.output
    assert sidecar["explanations"]["method"] == DEFAULT_CAM_METHOD and set(sidecar["explanations"]["findings"]) == set(sidecar["findings"])
    assert (study / "cxrtool_explain.html").is_file()
    for entry in sidecar["explanations"]["findings"].values():  # a 1-epoch model's map may be empty: then it says so
        assert entry.get("files", {}).get("overlay") or "no evidence" in entry["note"]
    # radiomics of the positive calls' CAM regions on the chest: one row per region, none missing
    regions = 0
    for dicom in dicoms:
        findings = json.loads((study / f"{dicom.name}.cxrtool.json").read_text())["results"][0]["explanations"]["findings"]
        regions += sum(region_doubt(Region.from_dict(region), entry.get("trust")) is None
                       for entry in findings.values() if entry["positive"] for region in entry["regions"])
    with open(study / "cxrtool_radiomics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == regions and "Radiomics of the positive calls" in result.output
    located = json.loads((out / "evaluation" / "localization.json").read_text())
    assert located["overall"]["pairs"] > 0 and located["overall"]["mapped"] == located["overall"]["pairs"]
    card = runner.invoke(app, ["models", str(out / "model" / "model.safetensors")])
    assert card.exit_code == 0 and "resnet18" in card.output


def test_models_lists_architectures_and_refuses_non_checkpoints(tmp_path):
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "densenet121" in result.output and "features.norm5" in result.output
    bogus = tmp_path / "x.safetensors"
    bogus.write_text("nope")
    result = runner.invoke(app, ["models", str(bogus)])
    assert result.exit_code == 2 and "not a safetensors file" in result.output


def test_python_dash_m_and_version():
    completed = subprocess.run([sys.executable, "-m", "cxrtool", "--version"], capture_output=True, text=True)
    assert completed.returncode == 0 and completed.stdout.startswith("cxrtool ")


def test_import_is_light():
    code = "import sys, cxrtool, cxrtool.registry, cxrtool.cli; print('torch' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.stdout.strip() == "False", completed.stderr


def test_torchvision_imports_next_to_this_torch():
    code = ("from cxrtool._compat import ensure_torchvision_importable as e; stubbed = e(); "
            "import torchvision, timm; print(stubbed, torchvision.__version__)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
