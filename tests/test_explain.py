"""`cxrtool explain`: CAMs equal pytorch-grad-cam's, per image and finding; maps, boxes and
masks land where the evidence is, through resizing and padding; real studies; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from typer.testing import CliRunner

from cxrtool.cli import app
from cxrtool.explain.cams import CAM_METHODS, CamEngine, ExplainUsageError
from cxrtool.explain.regions import find_regions, peak_point, to_original
from cxrtool.io.records import Explanation, Region
from cxrtool.models.checkpoint import ModelCard, save_checkpoint
from cxrtool.preprocess import Preprocessing, fit_to_square

FINDINGS = ["Effusion", "Nodule", "Cardiomegaly"]
runner = CliRunner()


class Toy(torch.nn.Module):
    """Logit = mean of a ReLU'd identity-like convolution of the input: its Grad-CAM is the
    brightness itself, so the map's peak must land on a planted bright patch."""

    cam_layer = "features"

    def __init__(self, n_findings: int = 2, weight: float = 1.0) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].weight[:, 0, 1, 1] = 1.0
            self.features[0].bias.zero_()
        self.head = torch.nn.Linear(2, n_findings)
        with torch.no_grad():
            self.head.weight.fill_(weight)
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def planted(corners: list[tuple[int, int]], size: int = 32, patch: int = 5) -> torch.Tensor:
    batch = torch.zeros(len(corners), 1, size, size)
    for i, (x, y) in enumerate(corners):
        batch[i, 0, y : y + patch, x : x + patch] = 1.0
    return batch


def test_every_image_gets_its_own_map_with_the_peak_on_its_planted_patch():
    corners = [(2, 3), (20, 22), (24, 4)]
    with CamEngine(Toy(), "gradcam") as engine:
        result = engine(planted(corners), [[0], [0, 1], [1]])
    assert set(result.maps) == {(0, 0), (1, 0), (1, 1), (2, 1)}
    for (image, _), cam in result.maps.items():
        x, y = peak_point(cam)
        cx, cy = corners[image]
        assert cx <= x < cx + 5 and cy <= y < cy + 5, (image, x, y)
    assert result.probabilities.shape == (3, 2)


def test_a_model_with_no_evidence_gives_a_zero_map_and_no_regions_not_nan():
    with CamEngine(Toy(weight=0.0), "gradcam") as engine:
        result = engine(planted([(4, 4)]), [[0]])
    cam = result.maps[(0, 0)]
    assert np.isfinite(cam).all() and cam.max() == 0.0
    assert find_regions(cam, 0.5) is None


def _min_max(cam: np.ndarray) -> np.ndarray:
    cam = cam - cam.min()
    return cam / (cam.max() + 1e-7)


@pytest.mark.parametrize("method", list(CAM_METHODS))
def test_batched_maps_equal_plain_pytorch_grad_cam_one_image_one_target(method):
    """One forward and a truncated backward per finding give the package's own maps."""
    from cxrtool.models.network import CXRClassifier

    torch.manual_seed(0)
    network = CXRClassifier("resnet18", FINDINGS).eval()
    # Score-CAM and Ablation-CAM run a forward pass per channel: a narrower layer keeps it quick.
    slow = method in ("scorecam", "ablationcam")
    layer = "backbone.layer2" if slow else "backbone.layer4"
    images = torch.randn(2, 1, 48 if slow else 64, 48 if slow else 64)
    wanted = [[2], [1]] if slow else [[0, 2], [1]]
    with CamEngine(network, method, layer=layer) as engine:
        assert engine.grids[0] is not None  # (measured: the maps are drawn on the cells' centres)
        # the package resizes its maps from the feature grid the plain way; drawn that way, ours
        # are its maps (where the cells sit: test_evidence.py::test_maps_are_drawn_where_the_feature_cells_sit)
        engine.grids = [None] * len(engine.grids)
        result = engine(images, wanted)
    reference = CXRClassifier("resnet18", FINDINGS).eval()
    reference.load_state_dict(network.state_dict())
    with CAM_METHODS[method](model=reference, target_layers=[reference.get_submodule(layer)]) as plain:
        for image, findings in enumerate(wanted):
            for finding in findings:
                expected = plain(input_tensor=images[image : image + 1], targets=[ClassifierOutputTarget(finding)])[0]
                np.testing.assert_allclose(_min_max(result.maps[(image, finding)]), expected, atol=2e-3)


def test_target_layer_comes_from_the_card_and_bad_names_list_the_choices():
    from cxrtool.models.network import CXRClassifier

    network = CXRClassifier("resnet18", FINDINGS)
    assert CamEngine(network, "gradcam").layer_name == "backbone.layer4"
    assert CamEngine(network, "gradcam", layer="backbone.layer3").layer_name == "backbone.layer3"
    with pytest.raises(ExplainUsageError, match="backbone.layer4"):
        CamEngine(network, "gradcam", layer="backbone.layer9")
    with pytest.raises(ExplainUsageError, match="gradcam"):
        CamEngine(network, "smoothcam")
    unknown = CXRClassifier("resnet26", FINDINGS)  # a timm backbone the registry has no CAM layer for
    with pytest.raises(ExplainUsageError, match="--layer"):
        CamEngine(unknown, "gradcam")


# ------------------------------------------------------------------ maps back to pixels


def test_boxes_map_back_through_resizing_and_padding():
    """A hot patch on a 2:1 radiograph, letterboxed to 64x64, comes back where it was."""
    height, width = 300, 150  # tall: padded left and right
    prep = Preprocessing(input_size=64)
    _, geometry = fit_to_square(np.zeros((height, width), np.float32), prep)
    assert geometry.pad_x > 0 and geometry.pad_y == 0
    x0, y0, w0, h0 = 60, 100, 40, 60  # the true region, original pixels
    left, top = geometry.to_input(x0, y0)
    right, bottom = geometry.to_input(x0 + w0, y0 + h0)
    cam = np.zeros((64, 64), np.float32)
    cam[round(top) : round(bottom), round(left) : round(right)] = 1.0
    back = to_original(cam, geometry)
    assert back.shape == (height, width)
    regions = find_regions(back, 0.5)
    assert regions is not None and len(regions.regions) == 1
    box = regions.regions[0]
    assert abs(box.x - x0) <= 3 and abs(box.y - y0) <= 3
    assert abs(box.width - w0) <= 5 and abs(box.height - h0) <= 5
    assert regions.labels.shape == (height, width) and set(np.unique(regions.labels)) == {0, 1}


def test_regions_are_labelled_strongest_first_and_otsu_splits_a_bimodal_map():
    cam = np.zeros((40, 40), np.float32)
    cam[2:6, 2:6] = 0.6
    cam[20:30, 20:30] = 1.0
    regions = find_regions(cam, 0.5)
    assert [(r.label, r.x, r.y, r.width, r.height) for r in regions.regions] == [(1, 20, 20, 10, 10), (2, 2, 2, 4, 4)]
    assert regions.regions[1].peak == pytest.approx(0.6) and regions.regions[0].mean == pytest.approx(1.0)
    assert find_regions(cam, 0.7).regions[0].area_px == 100 and len(find_regions(cam, 0.7).regions) == 1
    otsu = find_regions(cam, "otsu")
    assert 0.0 <= otsu.level < 0.6 and len(otsu.regions) == 2  # Otsu: pixels above the level
    sliver = cam.copy()
    sliver[10:25, 35] = 0.9  # a one-pixel-thin ridge above the threshold is not a region
    thin = find_regions(sliver, 0.5)
    assert len(thin.regions) == 2 and not thin.labels[10:25, 35].any()
    spacing = (0.5, 0.25)
    record = regions.regions[0].record(spacing)
    assert record.box_mm == [5.0, 10.0, 2.5, 5.0] and record.area_mm2 == 12.5
    as_dict = record.to_dict()
    assert as_dict["box"] == [20, 20, 10, 10] and as_dict["box_mm"] == [5.0, 10.0, 2.5, 5.0]
    assert Region.from_dict(as_dict) == record  # the sidecar's JSON reads back as it was written


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from cxrtool.models.network import CXRClassifier

    torch.manual_seed(0)
    model = CXRClassifier("resnet18", FINDINGS)
    card = ModelCard("resnet18", FINDINGS, Preprocessing(input_size=64).to_dict(), name="tiny",
                     thresholds={"Effusion": 0.0, "Nodule": 1.0, "Cardiomegaly": 1.0})
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors", model, card)


@pytest.fixture(scope="module")
def real_studies(tmp_path_factory, nih_dir: Path, dicom_dir: Path) -> Path:
    """Eight NIH PNGs and every real DICOM (all transfer syntaxes), plus a corrupt file."""
    folder = tmp_path_factory.mktemp("studies")
    for png in sorted((nih_dir / "images").glob("*.png"))[:8]:
        shutil.copy(png, folder / png.name)
    (folder / "dicom").mkdir()
    for dcm in sorted(dicom_dir.rglob("*.dcm")):
        shutil.copy(dcm, folder / "dicom" / dcm.name)
    (folder / "broken.dcm").write_bytes(b"DICM" * 10)
    return folder


def test_explain_real_nih_images_and_dicoms_writes_maps_masks_boxes_and_a_contact_sheet(checkpoint, real_studies, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["explain", str(real_studies), "--model", str(checkpoint), "--out", str(out),
                                 "-f", "Effusion", "-f", "Cardiomegaly", "--workers", "2", "--overlay-size", "256"])
    assert result.exit_code == 1, result.output  # the corrupt file fails, the rest is done
    assert "broken.dcm" in result.output
    sidecars = sorted(out.rglob("*.cxrtool.json"))
    n_studies = 8 + len(list((real_studies / "dicom").glob("*.dcm")))
    assert len(sidecars) == n_studies
    for sidecar in sidecars:
        record = json.loads(sidecar.read_text())
        height, width = record["image_size"]
        (result,) = record["results"]
        explained = result["explanations"]["findings"]
        assert set(explained) == {"Effusion", "Cardiomegaly"}
        # the typed record reads the JSON back as written, keys it does not know included
        assert Explanation.from_dict(result["explanations"]).to_dict() == result["explanations"]
        unknown = {**result["explanations"], "later": {"x": 1}}
        assert Explanation.from_dict(unknown).to_dict() == unknown
        for entry in explained.values():
            assert 0.0 <= entry["probability"] <= 1.0
            if not entry["regions"]:
                assert "no evidence" in entry["note"]
                continue
            for region in entry["regions"]:
                x, y, w, h = region["box"]
                assert 0 <= x < x + w <= width and 0 <= y < y + h <= height
                assert 0.0 < region["mean"] <= region["peak"] <= 1.0
            px, py = entry["peak"]
            assert 0 <= px < width and 0 <= py < height
            mask = cv2.imread(str(sidecar.parent / entry["files"]["mask"]), cv2.IMREAD_UNCHANGED)
            assert mask.shape == (height, width) and mask.max() == len(entry["regions"])
            raw = cv2.imread(str(sidecar.parent / entry["files"]["map"]), cv2.IMREAD_UNCHANGED)
            assert raw.dtype == np.uint16 and raw.shape == (height, width) and raw.max() == 65535
            assert raw[py, px] == 65535  # the recorded peak is the map's maximum
            picture = cv2.imread(str(sidecar.parent / entry["files"]["overlay"]))
            assert max(picture.shape[:2]) <= 256
            if record.get("pixel_spacing_mm"):
                assert "box_mm" in entry["regions"][0] and "peak_mm" in entry
    # DICOMs carry their spacing: millimetres appear
    dicom_record = json.loads(next((out / "dicom").glob("*.cxrtool.json")).read_text())
    assert dicom_record["pixel_spacing_mm"]
    sheet = (out / "cxrtool_explain.html").read_text()
    assert sheet.startswith("<!doctype html>") and sheet.count("<section>") == 8
    assert ".Effusion.overlay.png" in sheet
    assert (out / "dicom" / "cxrtool_explain.html").is_file()
    # a re-run skips what is done; other settings are explained again
    again = runner.invoke(app, ["explain", str(real_studies), "--model", str(checkpoint), "--out", str(out),
                                "-f", "Effusion", "-f", "Cardiomegaly", "--workers", "0", "--overlay-size", "256"])
    assert f"0 explained, {n_studies} already done, 1 failed" in again.output
    otsu = runner.invoke(app, ["explain", str(real_studies / "dicom"), "--model", str(checkpoint), "--out", str(tmp_path / "o2"),
                               "-f", "Nodule", "--threshold", "otsu", "--map-format", "npy", "--workers", "0"])
    assert otsu.exit_code == 0, otsu.output
    record = json.loads(next((tmp_path / "o2").glob("*.cxrtool.json")).read_text())
    entry = record["results"][0]["explanations"]["findings"]["Nodule"]
    raw = np.load(tmp_path / "o2" / entry["files"]["map"])
    assert raw.dtype == np.float32 and raw.max() == pytest.approx(entry["map_max"], rel=1e-4)


def test_default_explains_each_study_positive_calls_only(checkpoint, tmp_path, nih_dir):
    folder = tmp_path / "s"
    folder.mkdir()
    for png in sorted((nih_dir / "images").glob("*.png"))[:3]:
        shutil.copy(png, folder / png.name)
    result = runner.invoke(app, ["explain", str(folder), "--model", str(checkpoint), "--workers", "0", "--jsonl"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 3
    for record in records:  # thresholds: Effusion 0 (always positive), the others 1 (never)
        assert record["positive_findings"] == ["Effusion"]
        assert list(record["explanations"]["findings"]) == ["Effusion"]
    assert (folder / "cxrtool_predictions.csv").is_file()


def test_bad_requests_exit_2_naming_the_choices(checkpoint, tmp_path, nih_dir):
    png = sorted((nih_dir / "images").glob("*.png"))[0]
    cases = [
        (["-f", "Pneumonia"], "its findings are: Effusion, Nodule, Cardiomegaly"),
        (["--layer", "backbone.nope"], "backbone.layer4"),
        (["--cam", "smoothgrad"], "gradcam, gradcam++"),
        (["--threshold", "1.5"], "otsu"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["explain", str(png), "--model", str(checkpoint), "--out", str(tmp_path), *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output
    # a checkpoint whose backbone has no known CAM layer
    from cxrtool.models.network import CXRClassifier

    odd = save_checkpoint(tmp_path / "odd.safetensors", CXRClassifier("resnet26", FINDINGS),
                          ModelCard("resnet26", FINDINGS, Preprocessing(input_size=64).to_dict()))
    result = runner.invoke(app, ["explain", str(png), "--model", str(odd), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no known CAM layer" in result.output
    ok = runner.invoke(app, ["explain", str(png), "--model", str(odd), "--out", str(tmp_path), "--layer", "backbone.layer4",
                             "-f", "Nodule", "--workers", "0"])
    assert ok.exit_code == 0, ok.output
