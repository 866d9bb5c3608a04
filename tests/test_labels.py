"""Label tables: NIH (real metadata), CheXpert and generic CSVs, patient splits, boxes."""

from __future__ import annotations

import csv
import gzip
import math
from pathlib import Path

import numpy as np
import pytest

from cxrtool.data.labels import Box, LabelTable, patient_split, read_boxes, read_labels
from cxrtool.registry import NIH_FINDINGS, PHANTOM_FINDINGS

NIH_CSV_NAME = "Data_Entry_2017_v2020.csv.gz"
NIH_TOTAL_ROWS = 112_120
NIH_IMAGES_HERE = 388


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.lstrip("\n"), encoding="utf-8")
    return path


def _touch(*paths: Path) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


# --------------------------------------------------------------------------- NIH


@pytest.fixture(scope="module")
def nih_csv(nih_dir: Path) -> Path:
    path = nih_dir / NIH_CSV_NAME
    if not path.is_file():
        pytest.skip(f"NIH metadata not found at {path}")
    return path


@pytest.fixture(scope="module")
def nih_table(nih_csv: Path) -> LabelTable:
    return read_labels(nih_csv)


def test_nih_real_metadata_keeps_rows_with_images(nih_table: LabelTable, nih_dir: Path) -> None:
    on_disk = {p.name for p in (nih_dir / "images").glob("*.png")}
    assert len(on_disk) == NIH_IMAGES_HERE
    assert nih_table.source == "nih"
    assert nih_table.findings == NIH_FINDINGS
    assert len(nih_table) == NIH_IMAGES_HERE
    assert nih_table.skipped == NIH_TOTAL_ROWS - NIH_IMAGES_HERE
    assert {nih_table.key_for(i) for i in range(len(nih_table))} == on_disk
    assert nih_table.targets.dtype == np.float32
    assert nih_table.targets.shape == (NIH_IMAGES_HERE, 14)
    assert set(np.unique(nih_table.targets).tolist()) <= {0.0, 1.0}
    assert set(nih_table.views) <= {"PA", "AP"}
    assert len(set(nih_table.patients)) == NIH_IMAGES_HERE  # one image per patient here
    assert all(nih_table.resolve_image(i).is_file() for i in range(len(nih_table)))
    assert nih_table.image_root == (nih_dir / "images").resolve()


def test_nih_labels_match_the_csv_text(nih_table: LabelTable, nih_csv: Path) -> None:
    with gzip.open(nih_csv, "rt", newline="") as fh:
        rows = {r["Image Index"]: r for r in csv.DictReader(fh)}
    for i in range(len(nih_table)):
        row = rows[nih_table.key_for(i)]
        labels = set(row["Finding Labels"].split("|"))
        expected = [1.0 if f in labels else 0.0 for f in NIH_FINDINGS]
        assert nih_table.targets[i].tolist() == expected
        assert nih_table.patients[i] == row["Patient ID"]
        assert nih_table.views[i] == row["View Position"]
    no_finding = [i for i in range(len(nih_table)) if rows[nih_table.key_for(i)]["Finding Labels"] == "No Finding"]
    assert no_finding and not nih_table.targets[no_finding].any()
    counts = nih_table.positives()
    assert list(counts) == list(NIH_FINDINGS)
    assert sum(counts.values()) == int(nih_table.targets.sum())


def test_nih_can_keep_missing_rows(nih_csv: Path, nih_dir: Path) -> None:
    table = read_labels(nih_csv, require_images=False)
    assert len(table) == NIH_TOTAL_ROWS and table.skipped == 0
    assert table.resolve_image(0) == (nih_dir / "images").resolve() / "00000001_000.png"


def test_nih_findings_subset(nih_csv: Path, nih_table: LabelTable) -> None:
    table = read_labels(nih_csv, findings=PHANTOM_FINDINGS)
    assert table.findings == PHANTOM_FINDINGS and table.targets.shape == (NIH_IMAGES_HERE, 8)
    full = nih_table
    cols = [NIH_FINDINGS.index(f) for f in PHANTOM_FINDINGS]
    np.testing.assert_array_equal(table.targets, full.targets[:, cols])
    with pytest.raises(ValueError, match="not NIH ChestX-ray14 labels"):
        read_labels(nih_csv, findings=["Fracture"])


def test_nih_small_csv_plain_and_gz(tmp_path: Path) -> None:
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
    text = "\n" + header + """
a_000.png,Cardiomegaly|Infiltration,0,7,50,M,PA,1,1,0.1,0.1
a_001.png,No Finding,1,7,51,M,AP,1,1,0.1,0.1
b_000.png,Hernia|Unknown Thing,0,8,40,F,PA,1,1,0.1,0.1
"""
    plain = _write(tmp_path / "meta.csv", text)
    with gzip.open(tmp_path / "meta.csv.gz", "wt", encoding="utf-8") as fh:
        fh.write(text.lstrip("\n"))
    _touch(tmp_path / "images" / "a_000.png", tmp_path / "images" / "b_000.png")
    for path in (plain, tmp_path / "meta.csv.gz"):
        table = read_labels(path)
        assert table.images == ["a_000.png", "b_000.png"] and table.skipped == 1
        assert table.patients == ["7", "8"]
        assert table.targets[0, NIH_FINDINGS.index("Cardiomegaly")] == 1
        assert table.targets[0, NIH_FINDINGS.index("Infiltration")] == 1
        assert table.targets[1].sum() == 1  # the unknown label is ignored
        assert table.resolve_image(1) == (tmp_path / "images" / "b_000.png").resolve()


# --------------------------------------------------------------------------- CheXpert

CHEXPERT_CSV = """
Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Edema,Pleural Effusion
CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,F,68,Frontal,AP,1.0,,,
CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,F,87,Frontal,PA,,-1.0,1.0,0.0
CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg,F,87,Lateral,,,-1.0,1.0,0.0
CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,M,41,Frontal,,,1.0,-1.0,1.0
"""


def _chexpert(tmp_path: Path) -> Path:
    csv_path = _write(tmp_path / "CheXpert-v1.0-small" / "train.csv", CHEXPERT_CSV)
    for line in CHEXPERT_CSV.strip().splitlines()[1:]:
        _touch(tmp_path / line.split(",")[0])
    return csv_path


@pytest.mark.parametrize(
    ("policy", "uncertain_value"), [("ignore", math.nan), ("positive", 1.0), ("negative", 0.0)]
)
def test_chexpert_uncertain_policies(tmp_path: Path, policy: str, uncertain_value: float) -> None:
    table = read_labels(_chexpert(tmp_path), uncertain=policy)
    assert table.source == "chexpert"
    assert table.findings == ("No Finding", "Cardiomegaly", "Edema", "Pleural Effusion")
    expected = np.array(
        [
            [1, 0, 0, 0],  # blanks are negatives
            [0, uncertain_value, 1, 0],
            [0, uncertain_value, 1, 0],
            [0, 1, uncertain_value, 1],
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(table.targets, expected)  # NaN == NaN for this assert


def test_chexpert_patients_views_and_paths(tmp_path: Path) -> None:
    table = read_labels(_chexpert(tmp_path))
    assert table.patients == ["patient00001", "patient00002", "patient00002", "patient00003"]
    assert table.views == ["AP", "PA", "LATERAL", "UNKNOWN"]
    assert table.skipped == 0
    # Paths start with the dataset folder, so they resolve against the CSV's parent.
    assert all(table.resolve_image(i).is_file() for i in range(len(table)))
    assert table.key_for(2) == "view2_lateral.jpg"
    (tmp_path / table.images[3]).unlink()
    assert len(read_labels(tmp_path / "CheXpert-v1.0-small" / "train.csv")) == 3


def test_chexpert_findings_subset_and_bad_value(tmp_path: Path) -> None:
    csv_path = _chexpert(tmp_path)
    table = read_labels(csv_path, findings=["Edema", "Cardiomegaly"], require_images=False)
    assert table.findings == ("Edema", "Cardiomegaly")
    with pytest.raises(ValueError, match="not in the header"):
        read_labels(csv_path, findings=["Fracture"])
    bad = _write(tmp_path / "bad.csv", "Path,Cardiomegaly\nx/patient1/a.jpg,2.0\n")
    with pytest.raises(ValueError, match=r"line 2: 'Cardiomegaly' has '2.0'"):
        read_labels(bad, require_images=False)


def test_mimic_style_csv(tmp_path: Path) -> None:
    with_path = _write(
        tmp_path / "mimic.csv",
        "subject_id,study_id,Path,Atelectasis,Cardiomegaly\n"
        "10000032,50414267,files/p10/p10000032/s50414267/abc.jpg,1.0,\n"
        ",50414268,files/p10/p10000099/s50414268/def.jpg,-1.0,0.0\n",
    )
    table = read_labels(with_path, require_images=False)
    assert table.source == "chexpert"
    assert table.patients == ["10000032", "10000099"]
    without_path = _write(tmp_path / "neg.csv", "subject_id,study_id,Atelectasis\n1,2,1.0\n")
    with pytest.raises(ValueError, match="add a 'Path' column"):
        read_labels(without_path)


# --------------------------------------------------------------------------- generic


def test_generic_csv(tmp_path: Path) -> None:
    csv_path = _write(
        tmp_path / "labels.csv",
        "path,patient_id,view,Mass,Infiltrate\n"
        "img/a.png,p1,PA,1,0\n"
        "img/b.png,p1,lateral,0,\n"
        "img/c.png,,,1.0,1\n"
        "img/missing.png,p3,AP,0,0\n",
    )
    _touch(tmp_path / "img" / "a.png", tmp_path / "img" / "b.png", tmp_path / "img" / "c.png")
    table = read_labels(csv_path)
    assert table.source == "generic"
    assert table.findings == ("Mass", "Infiltrate")  # as the file spells them
    assert read_labels(csv_path, findings=["Infiltration"]).findings == ("Infiltrate",)  # asked for by an alias
    assert table.skipped == 1 and len(table) == 3
    assert table.patients == ["p1", "p1", "c"]  # blank patient -> image stem
    assert table.views == ["PA", "LATERAL", "UNKNOWN"]
    np.testing.assert_array_equal(table.targets, np.array([[1, 0], [0, np.nan], [1, 1]], np.float32))
    assert table.positives() == {"Mass": 2, "Infiltrate": 1}
    assert table.resolve_image(2) == (tmp_path / "img" / "c.png").resolve()

    sub = table.subset([2, 0])
    assert sub.images == ["img/c.png", "img/a.png"] and sub.targets.shape == (2, 2)
    assert sub.patients == ["c", "p1"] and sub.skipped == 1

    explicit_root = read_labels(csv_path, image_root=tmp_path / "elsewhere")
    assert len(explicit_root) == 0 and explicit_root.skipped == 4


def test_generic_bad_values_and_subset(tmp_path: Path) -> None:
    csv_path = _write(tmp_path / "l.csv", "path,age,Mass\na.png,57,1\n")
    with pytest.raises(ValueError, match=r"line 2: column 'age' has '57'.*0, 1 or blank"):
        read_labels(csv_path, require_images=False)
    table = read_labels(csv_path, findings=["Mass"], require_images=False)
    assert table.findings == ("Mass",) and table.patients == ["a"]


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("image_id,label\na.png,1\n", {}, r"unrecognised label CSV header.*expected NIH"),
        ("", {}, "empty file"),
        ("path,A\na.png,1\n", {"fmt": "xray"}, "unknown label format"),
        ("path,A\na.png,1\n", {"uncertain": "maybe"}, "unknown uncertain-label policy"),
        ("path,A\na.png,1\n", {"fmt": "nih"}, "NIH format needs column"),
        ("path\na.png\n", {}, "no finding columns"),
    ],
)
def test_bad_label_files(tmp_path: Path, text: str, kwargs: dict, message: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_labels(path, require_images=False, **kwargs)


def test_missing_label_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_labels(tmp_path / "nope.csv")


# --------------------------------------------------------------------------- split


def _synthetic_table(n_patients: int = 60, seed: int = 3) -> LabelTable:
    rng = np.random.default_rng(seed)
    images, patients, rows = [], [], []
    for p in range(n_patients):
        for k in range(int(rng.integers(1, 4))):  # 1-3 images per patient
            images.append(f"p{p}_{k}.png")
            patients.append(f"P{p:03d}")
            rows.append(rng.random(4) < [0.3, 0.1, 0.05, 0.0])
    targets = np.array(rows, dtype=np.float32)
    targets[[0, 5], 3] = 1  # a rare finding: exactly the patients of rows 0 and 5
    return LabelTable(("A", "B", "C", "Rare"), images, patients, ["PA"] * len(images), targets, "generic")


def test_patient_split_no_overlap_deterministic_and_covering() -> None:
    table = _synthetic_table()
    train, val = patient_split(table, val_fraction=0.1, seed=0)
    assert len(train) + len(val) == len(table)
    assert set(train.tolist()).isdisjoint(val.tolist())
    train_pat = {table.patients[i] for i in train}
    val_pat = {table.patients[i] for i in val}
    assert train_pat.isdisjoint(val_pat)
    assert len(val_pat) == 6  # 10% of 60 patients
    for f in range(len(table.findings)):
        positive_patients = {table.patients[i] for i in np.flatnonzero(table.targets[:, f] == 1)}
        if len(positive_patients) >= 2:
            assert positive_patients & val_pat, table.findings[f]
            assert positive_patients & train_pat, table.findings[f]
    again = patient_split(table, val_fraction=0.1, seed=0)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(val, again[1])
    other = patient_split(table, val_fraction=0.1, seed=1)[1]
    assert not np.array_equal(val, other)


def test_patient_split_edge_cases() -> None:
    two = LabelTable(("A",), ["a.png", "b.png"], ["x", "y"], ["PA", "PA"], np.array([[1], [0]]), "generic")
    train, val = patient_split(two, val_fraction=0.01)
    assert len(train) == 1 and len(val) == 1
    one = LabelTable(("A",), ["a.png"], ["x"], ["PA"], np.array([[1]]), "generic")
    with pytest.raises(ValueError, match="at least 2 patients"):
        patient_split(one)
    with pytest.raises(ValueError, match="val_fraction"):
        patient_split(two, val_fraction=1.5)


def test_patient_split_on_nih(nih_table: LabelTable) -> None:
    train, val = patient_split(nih_table, val_fraction=0.1, seed=0)
    assert len(val) == 39 and len(train) == NIH_IMAGES_HERE - 39
    val_counts = nih_table.subset(val).positives()
    assert all(count >= 1 for count in val_counts.values())


# --------------------------------------------------------------------------- boxes


def test_read_nih_boxes(nih_dir: Path) -> None:
    boxes = read_boxes(nih_dir / "BBox_List_2017.csv.gz")
    assert len(boxes) == 984
    assert all(isinstance(b, Box) for b in boxes)
    findings = {b.finding for b in boxes}
    assert "Infiltration" in findings and "Infiltrate" not in findings
    assert findings <= set(NIH_FINDINGS)
    first = boxes[0]
    assert first.image == "00013118_008.png" and first.finding == "Atelectasis"
    assert first.x == pytest.approx(225.084745762712) and first.h == pytest.approx(79.1864406779661)
    here = {p.name for p in (nih_dir / "images").glob("*.png")}
    assert len({b.image for b in boxes} & here) == 6


def test_read_generic_boxes_and_bad_header(tmp_path: Path) -> None:
    path = _write(tmp_path / "boxes.csv", "file,finding,x,y,w,h\na.png,Infiltrate,1,2,3.5,4\n")
    assert read_boxes(path) == [Box("a.png", "Infiltration", 1.0, 2.0, 3.5, 4.0)]
    bad = _write(tmp_path / "bad.csv", "image,label,left,top\na.png,Mass,1,2\n")
    with pytest.raises(ValueError, match="unrecognised box CSV header"):
        read_boxes(bad)
    not_numbers = _write(tmp_path / "nn.csv", "file,finding,x,y,w,h\na.png,Mass,1,two,3,4\n")
    with pytest.raises(ValueError, match="line 2: box coordinates must be numbers"):
        read_boxes(not_numbers)


# ----------------------------------------------------------------------------- PadChest and CXR-LT


def _padchest(tmp_path: Path) -> Path:
    from PIL import Image

    rows = [
        ("a.png", "0", "P1", "PA", "['pleural effusion', 'cardiomegaly']"),
        ("b.png", "0", "P1", "L", "['normal']"),
        ("c.png", "1", "P2", "AP_horizontal", "['nodule', ' aortic elongation', 'scoliosis']"),
        ("d.png", "1", "P3", "COSTAL", "['exclude']"),
        ("e.png", "1", "P4", "PA", "['Pleural Effusion']"),
    ]
    lines = ["ImageID,ImageDir,PatientID,Projection,Labels"]
    for image, folder, patient, projection, labels in rows:
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / folder / image)
        lines.append(f'{image},{folder},{patient},{projection},"{labels}"')
    return _write(tmp_path / "PADCHEST_labels.csv", "\n".join(lines) + "\n")


def test_padchest_labels_as_lists_projections_and_numbered_folders(tmp_path):
    from cxrtool.registry import CXR_LT_2026_FINDINGS

    path = _padchest(tmp_path)
    table = read_labels(path, findings=["cxr-lt-2026"])  # a label set's name stands for its findings
    assert table.source == "padchest" and table.findings == CXR_LT_2026_FINDINGS and len(table) == 5
    column = {name: j for j, name in enumerate(table.findings)}
    assert table.views == ["PA", "LATERAL", "AP", "UNKNOWN", "PA"]
    assert table.targets[0, column["pleural effusion"]] == 1 and table.targets[0, column["cardiomegaly"]] == 1
    assert table.targets[2, column["Nodule"]] == 1 and table.targets[2, column["aortic elongation"]] == 1
    assert table.targets[1, column["Normal"]] == 1 and table.targets[1].sum() == 1
    assert np.isnan(table.targets[3]).all()  # 'exclude': not a label set, left out of losses and metrics
    assert table.targets[4, column["pleural effusion"]] == 1  # spelled either way
    assert table.resolve_image(2) == tmp_path / "1" / "c.png"  # found in its numbered folder
    # Without a finding list: every label the file uses, the commonest first.
    assert read_labels(path).findings[0] == "pleural effusion"
    from cxrtool.data.labels import read_views

    views = read_views(path)
    found = {name: views.get(tmp_path / name) for name in ("a.png", "b.png", "c.png", "d.png", "e.png", "a.dcm")}
    assert found == {"a.png": "PA", "b.png": "LATERAL", "c.png": "AP", "d.png": None, "e.png": "PA", "a.dcm": "PA"}
