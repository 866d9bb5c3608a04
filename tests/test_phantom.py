"""Phantom cohort: anatomy, findings and their ground truth, NIH files, DICOM encodings."""

from __future__ import annotations

import csv
import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from cxrtool.data.phantom import (
    CTR_THRESHOLD,
    NIH_BBOX_HEADER,
    NIH_DATA_ENTRY_HEADER,
    TRANSFER_SYNTAXES,
    CohortInfo,
    PhantomCase,
    contact_sheet,
    generate_cohort,
    render_case,
    sample_findings,
    write_study_folder,
)
from cxrtool.registry import PHANTOM_FINDINGS

# Small images keep the suite fast; geometry is in millimetres, so findings scale with it.
SMALL = 128


def _case(seed: int, view: str = "PA", findings: tuple[str, ...] = (), size: int = SMALL) -> PhantomCase:
    return render_case(np.random.default_rng(seed), size=size, view=view, findings=findings)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- render_case


def test_render_is_deterministic_and_seed_dependent() -> None:
    a = _case(3, "PA", ("Effusion", "Nodule"))
    b = _case(3, "PA", ("Nodule", "Effusion"))  # order of the request does not matter
    c = _case(4, "PA", ("Effusion", "Nodule"))
    assert np.array_equal(a.image, b.image)
    assert a.findings == b.findings == ("Effusion", "Nodule")
    for name in a.masks:
        assert np.array_equal(a.masks[name], b.masks[name])
    assert a.boxes == b.boxes
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("view", ["PA", "AP", "LATERAL"])
@pytest.mark.parametrize("size", [96, 256])
def test_shapes_value_range_and_spacing(view: str, size: int) -> None:
    case = render_case(np.random.default_rng(11), size=size, view=view, findings=("Effusion",))
    assert case.image.shape == (size, size)
    assert case.image.dtype == np.float32
    assert np.isfinite(case.image).all()
    assert 0.0 <= float(case.image.min()) and float(case.image.max()) <= 1.0
    assert float(case.image.std()) > 0.1  # a real picture, not a flat field
    assert case.view_position == view
    row, col = case.pixel_spacing
    assert row == col and 340.0 <= row * size <= 430.0  # field of view in millimetres
    for mask in case.masks.values():
        assert mask.shape == (size, size) and mask.dtype == bool
    assert case.patient_id.startswith("PHANTOM-")


def test_bone_bright_air_dark() -> None:
    case = _case(5, "PA", size=256)
    lungs = case.anatomy["lung_right"] | case.anatomy["lung_left"]
    heart = case.anatomy["heart"]
    corner = case.image[:8, :8]  # outside the body: direct exposure
    assert case.image[lungs].mean() < case.image[heart].mean() - 0.25
    assert corner.mean() < case.image[lungs].mean()
    # The right hemidiaphragm sits higher than the left: compare the lowest lung rows.
    rows_r = np.nonzero(case.anatomy["lung_right"].any(axis=1))[0]
    rows_l = np.nonzero(case.anatomy["lung_left"].any(axis=1))[0]
    assert rows_r.max() <= rows_l.max()


def test_unknown_view_or_finding_is_rejected() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="view"):
        render_case(rng, view="OBLIQUE")
    with pytest.raises(ValueError, match="Hernia"):
        render_case(rng, findings=("Hernia",))


def test_masks_exactly_for_present_findings_and_boxes_match() -> None:
    rng = np.random.default_rng(2024)
    views = ("PA", "AP", "LATERAL")
    for i in range(24):
        findings = tuple(f for f in PHANTOM_FINDINGS if rng.random() < 0.3)
        case = render_case(rng, size=SMALL, view=views[i % 3], findings=findings)
        assert set(case.masks) == set(findings) == set(case.boxes)
        for name, mask in case.masks.items():
            assert mask.any(), f"{name} drawn without a mask ({case.view_position})"
            labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
            assert len(case.boxes[name]) == n
            covered = np.zeros_like(mask)
            for x, y, w, h in case.boxes[name]:
                box = mask[int(y) : int(y + h), int(x) : int(x + w)]
                covered[int(y) : int(y + h), int(x) : int(x + w)] = True
                # Tight: the component touches all four sides of its box.
                assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
            assert covered[mask].all()


def test_tiny_images_still_mask_every_finding() -> None:
    for seed in range(6):
        case = _case(seed, ("PA", "AP", "LATERAL")[seed % 3], tuple(PHANTOM_FINDINGS), size=40)
        assert all(mask.any() for mask in case.masks.values())
        assert all(case.boxes[name] for name in case.findings)


@pytest.mark.parametrize("view", ["PA", "AP", "LATERAL"])
def test_ctr_above_half_iff_cardiomegaly(view: str) -> None:
    for seed in range(8):
        normal = _case(seed, view)
        enlarged = _case(seed, view, ("Cardiomegaly",))
        assert 0.38 <= normal.ctr <= 0.48
        assert enlarged.ctr > CTR_THRESHOLD == 0.5
        if view != "LATERAL":
            # The recorded ratio is the drawn one: heart width / internal thoracic width.
            for case in (normal, enlarged):
                lungs = case.anatomy["lung_right"] | case.anatomy["lung_left"] | case.anatomy["heart"]
                cols_heart = np.nonzero(case.anatomy["heart"].any(axis=0))[0]
                cols_chest = np.nonzero(lungs.any(axis=0))[0]
                measured = (np.ptp(cols_heart) + 1) / (np.ptp(cols_chest) + 1)
                assert abs(measured - case.ctr) < 0.045, (seed, measured, case.ctr)


def test_ap_heart_looks_larger_than_pa() -> None:
    pa = np.mean([_case(s, "PA", size=64).ctr for s in range(25)])
    ap = np.mean([_case(s, "AP", size=64).ctr for s in range(25)])
    assert ap > pa  # AP magnification of the (anterior) heart


def _equivalent_diameter_mm(case: PhantomCase, name: str) -> float:
    area_px = float(case.masks[name].sum())
    return 2.0 * np.sqrt(area_px / np.pi) * case.pixel_spacing[0]


def test_nodules_below_and_masses_above_three_centimetres() -> None:
    for seed in range(9):
        view = ("PA", "AP", "LATERAL")[seed % 3]
        nodule = _case(seed, view, ("Nodule",), size=192)
        mass = _case(seed, view, ("Mass",), size=192)
        assert _equivalent_diameter_mm(nodule, "Nodule") < 30.0
        assert _equivalent_diameter_mm(mass, "Mass") > 30.0
        lungs = nodule.anatomy.get("lungs")
        if lungs is None:
            lungs = nodule.anatomy["lung_right"] | nodule.anatomy["lung_left"]
        # Inside the lung fields (a rasterised rim pixel may stick out).
        assert (nodule.masks["Nodule"] & ~lungs).sum() <= 0.1 * nodule.masks["Nodule"].sum()


def test_nodule_and_mass_are_brighter_than_the_same_lung_without() -> None:
    for seed in range(4):
        for name in ("Nodule", "Mass"):
            with_it = _case(seed, "PA", (name,), size=192)
            without = _case(seed, "PA", size=192)
            m = with_it.masks[name]
            assert with_it.image[m].mean() > without.image[m].mean() + 0.05


def test_effusion_whitens_the_costophrenic_angle() -> None:
    for seed in range(6):
        view = "LATERAL" if seed == 5 else "PA"
        with_it = _case(seed, view, ("Effusion",))
        without = _case(seed, view)
        angles = [k for k in with_it.anatomy if k.startswith("costophrenic_")]
        gain = max(
            with_it.image[with_it.anatomy[k]].mean() - without.image[with_it.anatomy[k]].mean()
            for k in angles
            if with_it.anatomy[k].any()
        )
        assert gain > 0.05, (seed, gain)
        m = with_it.masks["Effusion"]
        assert with_it.image[m].mean() > without.image[m].mean() + 0.1


def _local_variance(image: np.ndarray) -> np.ndarray:
    detail = image - ndimage.gaussian_filter(image, 1.0)
    return ndimage.uniform_filter(detail * detail, 3)


def test_pneumothorax_rim_is_darker_and_featureless() -> None:
    compared = 0
    for seed in range(8):
        with_it = _case(seed, "PA", ("Pneumothorax",), size=256)
        without = _case(seed, "PA", size=256)
        rim = with_it.masks["Pneumothorax"]
        assert rim.sum() > 20
        assert with_it.image[rim].mean() < without.image[rim].mean() - 0.02
        # Away from the rim's own edges (chest wall, pleural line), no lung markings.
        core = ndimage.binary_erosion(rim, iterations=3)
        if core.sum() >= 100:
            compared += 1
            assert _local_variance(with_it.image)[core].mean() < _local_variance(without.image)[core].mean()
    assert compared >= 4


@pytest.mark.parametrize("name", ["Consolidation", "Edema", "Atelectasis"])
def test_airspace_findings_add_density_in_their_mask(name: str) -> None:
    for seed in range(4):
        with_it = _case(seed, ("PA", "AP")[seed % 2], (name,))
        without = _case(seed, ("PA", "AP")[seed % 2])
        m = with_it.masks[name]
        assert with_it.image[m].mean() > without.image[m].mean() + 0.03


def test_edema_is_bilateral() -> None:
    for seed in range(4):
        case = _case(seed, "PA", ("Edema",))
        mask = case.masks["Edema"]
        assert (mask & case.anatomy["lung_right"]).any() and (mask & case.anatomy["lung_left"]).any()
        assert len(case.boxes["Edema"]) >= 2


# --------------------------------------------------------------------------- co-occurrence


def test_sample_findings_prevalences_and_correlations() -> None:
    rng = np.random.default_rng(0)
    samples = [sample_findings(rng) for _ in range(2000)]
    assert all(s == tuple(f for f in PHANTOM_FINDINGS if f in s) for s in samples)
    prevalence = {f: np.mean([f in s for s in samples]) for f in PHANTOM_FINDINGS}
    expected = {"Effusion": 0.25, "Atelectasis": 0.2, "Cardiomegaly": 0.15, "Edema": 0.1,
                "Consolidation": 0.1, "Nodule": 0.1, "Mass": 0.06, "Pneumothorax": 0.05}  # fmt: skip
    for finding, p in expected.items():
        assert abs(prevalence[finding] - p) < 0.035, (finding, prevalence[finding])
    assert abs(np.mean([len(s) == 0 for s in samples]) - 0.40) < 0.04

    def conditional(a: str, b: str, given: bool) -> float:
        return float(np.mean([a in s for s in samples if (b in s) == given]))

    assert conditional("Edema", "Cardiomegaly", True) > 2 * conditional("Edema", "Cardiomegaly", False)
    assert conditional("Edema", "Effusion", True) > 2 * conditional("Edema", "Effusion", False)
    assert conditional("Atelectasis", "Effusion", True) > conditional("Atelectasis", "Effusion", False)
    assert conditional("Atelectasis", "Consolidation", True) > conditional(
        "Atelectasis", "Consolidation", False
    )
    assert max(len(s) for s in samples) >= 4  # a long tail of multi-finding images
    again = [sample_findings(np.random.default_rng(0)) for _ in range(3)]
    assert again[0] == again[1] == again[2] == samples[0]


# --------------------------------------------------------------------------- cohort files


@pytest.fixture(scope="module")
def png_cohort(tmp_path_factory: pytest.TempPathFactory) -> CohortInfo:
    out = tmp_path_factory.mktemp("png_cohort")
    return generate_cohort(out, n_images=16, size=96, seed=7, workers=1)


def test_nih_data_entry_format(png_cohort: CohortInfo, shared_data_nih_header: str | None) -> None:
    text = png_cohort.data_entry_csv.read_text(encoding="utf-8")
    assert "\r" not in text
    header, *lines = text.splitlines()
    assert header == NIH_DATA_ENTRY_HEADER
    if shared_data_nih_header is not None:
        assert header == shared_data_nih_header
    rows = list(csv.reader(lines))
    assert len(rows) == png_cohort.n_images == 16
    names = set()
    for row in rows:
        assert len(row) == len(header.split(","))  # the bracketed pairs are two columns each
        name, labels, followup, patient, age, sex, view, width, height, sx, sy = row
        assert name == f"{int(patient):08d}_{int(followup):03d}.png"
        assert (png_cohort.images_dir / name).is_file()
        names.add(name)
        parts = labels.split("|")
        if labels == "No Finding":
            assert not (png_cohort.masks_dir / Path(name).stem).exists()
        else:
            assert all(p in PHANTOM_FINDINGS for p in parts)
            assert parts == sorted(parts, key=PHANTOM_FINDINGS.index)
            masks = sorted(p.stem for p in (png_cohort.masks_dir / Path(name).stem).glob("*.png"))
            assert masks == sorted(parts)
        assert 18 <= int(age) <= 99 and sex in ("M", "F") and view in ("PA", "AP", "LL")
        assert width == height == "96" and float(sx) == float(sy) and 3.5 < float(sx) < 4.5
    assert len(names) == len(rows)
    counts = png_cohort.finding_counts
    assert sum(counts.values()) >= png_cohort.n_images
    assert counts["No Finding"] == sum(r[1] == "No Finding" for r in rows)


def test_nih_bbox_format_matches_masks(png_cohort: CohortInfo) -> None:
    from PIL import Image

    text = png_cohort.bbox_csv.read_text(encoding="utf-8")
    header, *lines = text.splitlines()
    assert header == NIH_BBOX_HEADER == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    rows = list(csv.reader(lines))
    assert rows, "no boxes written"
    for name, label, *box in rows:
        assert len(box) == 4 and label in PHANTOM_FINDINGS
        x, y, w, h = map(float, box)
        mask = np.array(Image.open(png_cohort.masks_dir / Path(name).stem / f"{label}.png")) > 0
        assert mask[int(y) : int(y + h), int(x) : int(x + w)].any()
    image = np.array(Image.open(next(png_cohort.images_dir.glob("*.png"))))
    assert image.dtype == np.uint8 and image.shape == (96, 96)


def test_cohort_reads_back_with_cxrtool_labels(png_cohort: CohortInfo) -> None:
    from cxrtool.data.labels import read_labels

    table = read_labels(png_cohort.data_entry_csv, findings=PHANTOM_FINDINGS)
    assert len(table) == png_cohort.n_images
    assert set(table.views) <= {"PA", "AP", "LATERAL"}


def test_cohort_is_byte_identical_for_a_seed_whatever_the_workers(tmp_path: Path) -> None:
    a = generate_cohort(tmp_path / "a", n_images=6, size=64, seed=3, workers=1)
    b = generate_cohort(tmp_path / "b", n_images=6, size=64, seed=3, workers=2)
    c = generate_cohort(tmp_path / "c", n_images=6, size=64, seed=4, workers=1)
    assert _digest(a.out_dir) == _digest(b.out_dir)
    assert _digest(a.out_dir) != _digest(c.out_dir)


@pytest.fixture(scope="module")
def dicom_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[CohortInfo, CohortInfo, CohortInfo]:
    out = tmp_path_factory.mktemp("dicom_cohort")
    mixed = generate_cohort(out / "mixed", n_images=16, size=96, seed=5, image_format="dicom", workers=1)
    plain = generate_cohort(out / "plain", n_images=16, size=96, seed=5, image_format="dicom",
                            transfer_syntaxes=("explicit",), workers=1, write_masks=False)  # fmt: skip
    png = generate_cohort(out / "png", n_images=16, size=96, seed=5, workers=1, write_masks=False)
    return mixed, plain, png


def test_dicom_cohort_every_transfer_syntax_is_lossless(dicom_cohort: tuple) -> None:
    import pydicom
    from PIL import Image

    mixed, plain, png = dicom_cohort
    seen: set[tuple[str, str]] = set()
    for path in sorted(mixed.images_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ref = pydicom.dcmread(plain.images_dir / path.name)
        arr = ds.pixel_array
        assert str(ref.file_meta.TransferSyntaxUID) == TRANSFER_SYNTAXES["explicit"]
        # Lossless whatever the encoding (photometric may differ between the two cohorts).
        same = arr if ds.PhotometricInterpretation == ref.PhotometricInterpretation else 4095 - arr
        assert np.array_equal(same, ref.pixel_array)
        assert ds.BitsAllocated == 16 and ds.BitsStored == 12 and ds.HighBit == 11
        assert ds.PixelRepresentation == 0 and int(arr.max()) <= 4095
        photometric = ds.PhotometricInterpretation
        seen.add((str(ds.file_meta.TransferSyntaxUID), photometric))
        # MONOCHROME1 stores inverted values: undoing it gives the PNG's picture.
        shown = 4095 - arr.astype(np.int32) if photometric == "MONOCHROME1" else arr.astype(np.int32)
        expected = np.array(Image.open(png.images_dir / path.with_suffix(".png").name), dtype=np.int32)
        assert np.abs(np.round(shown * 255 / 4095) - expected).max() <= 1
    for uid in TRANSFER_SYNTAXES.values():
        assert (uid, "MONOCHROME1") in seen and (uid, "MONOCHROME2") in seen


def test_dicom_attributes(dicom_cohort: tuple) -> None:
    import pydicom

    mixed, _, _ = dicom_cohort
    rows = list(csv.reader(mixed.data_entry_csv.read_text().splitlines()[1:]))
    by_name = {r[0]: r for r in rows}
    modalities, intercepts, windows, uids = set(), set(), 0, set()
    for path in sorted(mixed.images_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        row = by_name[path.name]
        number = int(row[3])
        assert ds.PatientID == f"PHANTOM-{number:05d}"
        assert str(ds.PatientName) == f"Phantom^{number:05d}"
        assert ds.ViewPosition == row[6]
        assert ds.Modality in ("DX", "CR")
        modalities.add(ds.Modality)
        assert float(ds.PixelSpacing[0]) == pytest.approx(float(row[9]), rel=1e-5)
        assert float(ds.ImagerPixelSpacing[0]) > float(ds.PixelSpacing[0])
        assert float(ds.RescaleSlope) == 1.0
        intercepts.add(int(float(ds.RescaleIntercept)))
        windows += "WindowCenter" in ds
        uids.add(ds.SOPInstanceUID)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert modalities == {"DX", "CR"}
    assert intercepts == {0, -1024}
    assert 0 < windows < mixed.n_images
    assert len(uids) == mixed.n_images


def test_study_folder_is_flat_dicom_with_labels(tmp_path: Path) -> None:
    from cxrtool.io.studies import find_studies

    info = write_study_folder(tmp_path / "heldout", n_images=4, seed=9, size=64, workers=1)
    assert info.images_dir == info.out_dir and info.masks_dir is None
    found = list(find_studies([info.out_dir]))
    assert sorted(p.name for p in found) == sorted(p.name for p in info.out_dir.glob("*.dcm"))
    assert len(found) == 4
    first = next(csv.reader(info.data_entry_csv.read_text().splitlines()[1:]))
    assert int(first[3]) >= 90001  # held-out patients never collide with a default cohort


def test_contact_sheet(tmp_path: Path) -> None:
    from PIL import Image

    specs = [("PA", ("Mass",)), ("AP", ()), ("LATERAL", ("Effusion",))]
    cases = [_case(i, v, f) for i, (v, f) in enumerate(specs)]
    path = contact_sheet(cases, tmp_path / "sheet.png", columns=2)
    sheet = np.array(Image.open(path))
    assert sheet.shape == (2 * SMALL, 2 * SMALL, 3)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shared_data_nih_header() -> str | None:
    """The real NIH Data_Entry header, when the shared data is here."""
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    path = shared / "nih" / "Data_Entry_2017_v2020.csv.gz"
    if not path.is_file():
        return None
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return fh.readline().rstrip("\n")
