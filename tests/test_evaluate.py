"""Classification metrics against scikit-learn, thresholds, bootstrap and evaluate()."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score, roc_curve

from cxrtool.cli.evaluate import render_table
from cxrtool.data.labels import LabelTable
from cxrtool.evaluate import (
    EvaluationReport,
    auprc,
    auroc,
    bootstrap_ci,
    choose_thresholds,
    evaluate,
    macro_average,
    micro_metrics,
    threshold_metrics,
)


def _random_data(n: int = 400, f: int = 5, seed: int = 0, nan_rate: float = 0.15):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, f)) < rng.uniform(0.05, 0.5, f)).astype(np.float64)
    # Coarse rounding forces many ties, within and across classes.
    score = np.round(np.clip(0.35 * y + rng.random((n, f)) * 0.7, 0, 1), 1)
    y[rng.random((n, f)) < nan_rate] = np.nan
    return y, score


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_auprc_equal_sklearn_with_ties_and_nan(seed: int) -> None:
    y, s = _random_data(seed=seed)
    assert len(np.unique(s)) <= 11  # plenty of ties
    ours_roc, ours_ap = auroc(y, s), auprc(y, s)
    for f in range(y.shape[1]):
        keep = ~np.isnan(y[:, f])
        assert abs(ours_roc[f] - roc_auc_score(y[keep, f], s[keep, f])) < 1e-9
        assert abs(ours_ap[f] - average_precision_score(y[keep, f], s[keep, f])) < 1e-9


def test_metrics_on_continuous_scores_and_1d() -> None:
    rng = np.random.default_rng(5)
    y = (rng.random(1000) < 0.3).astype(float)
    s = rng.random(1000) + 0.2 * y
    assert isinstance(auroc(y, s), float)
    assert abs(auroc(y, s) - roc_auc_score(y, s)) < 1e-9
    assert abs(auprc(y, s) - average_precision_score(y, s)) < 1e-9


def test_single_class_gives_nan_not_crash() -> None:
    y = np.array([[1, 0], [1, 1], [1, np.nan], [1, 0]], dtype=float)
    s = np.array([[0.2, 0.1], [0.5, 0.9], [0.7, 0.3], [0.1, 0.4]])
    values = auroc(y, s)
    assert math.isnan(values[0]) and values[1] == 1.0
    assert math.isnan(auprc(y, s)[0])
    assert math.isnan(auroc(np.full(3, np.nan), np.zeros(3)))
    assert math.isnan(macro_average([np.nan, np.nan])) and macro_average([0.8, np.nan, 0.6]) == pytest.approx(0.7)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same"):
        auroc(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        auroc([0, 2, 1], [0.1, 0.2, 0.3])


def test_threshold_metrics_match_sklearn() -> None:
    y, s = _random_data(seed=3)
    thr = np.array([0.3, 0.5, 0.6, 0.45, 0.7])
    out = threshold_metrics(y, s, thr)
    for f in range(y.shape[1]):
        keep = ~np.isnan(y[:, f])
        yt, pred = y[keep, f].astype(int), (s[keep, f] >= thr[f]).astype(int)
        assert out["f1"][f] == pytest.approx(f1_score(yt, pred, zero_division=np.nan))
        tp = np.sum((yt == 1) & (pred == 1))
        tn = np.sum((yt == 0) & (pred == 0))
        assert out["tp"][f] == tp and out["tn"][f] == tn
        assert out["sensitivity"][f] == pytest.approx(tp / np.sum(yt == 1))
        assert out["specificity"][f] == pytest.approx(tn / np.sum(yt == 0))
        assert out["ppv"][f] == pytest.approx(tp / max(1, np.sum(pred == 1)))
    none_predicted = threshold_metrics([1, 0], [0.1, 0.2], 0.9)
    assert math.isnan(none_predicted["ppv"][0]) and none_predicted["f1"][0] == 0.0


def test_micro_pools_all_pairs() -> None:
    y, s = _random_data(seed=4)
    keep = ~np.isnan(y)
    micro = micro_metrics(y, s, 0.5)
    assert abs(micro["auroc"] - roc_auc_score(y[keep], s[keep])) < 1e-9
    assert abs(micro["auprc"] - average_precision_score(y[keep], s[keep])) < 1e-9
    assert micro["f1"] == pytest.approx(f1_score(y[keep].astype(int), (s[keep] >= 0.5).astype(int)))


# --------------------------------------------------------------------------- thresholds


def test_f1_thresholds_maximise_f1_by_brute_force() -> None:
    rng = np.random.default_rng(7)
    y = (rng.random((300, 4)) < [0.1, 0.3, 0.5, 0.05]).astype(float)
    s = np.round(rng.random((300, 4)) * 0.8 + 0.25 * y, 2)
    y[rng.random(y.shape) < 0.1] = np.nan
    chosen = choose_thresholds(y, s, "f1")
    got = threshold_metrics(y, s, chosen)["f1"]
    for f in range(4):
        keep = ~np.isnan(y[:, f])
        best = max(
            f1_score(y[keep, f], s[keep, f] >= t, zero_division=0.0) for t in np.unique(s[keep, f])
        )
        assert got[f] == pytest.approx(best, abs=1e-12)


def test_youden_thresholds_maximise_j() -> None:
    rng = np.random.default_rng(8)
    y = (rng.random(500) < 0.3).astype(float)
    s = np.round(rng.random(500) + 0.3 * y, 2)
    t = choose_thresholds(y, s, "youden")[0]
    fpr, tpr, _ = roc_curve(y, s)
    m = threshold_metrics(y, s, t)
    assert m["sensitivity"][0] + m["specificity"][0] - 1 == pytest.approx(np.max(tpr - fpr))


def test_threshold_fallback_and_errors() -> None:
    y = np.array([[0, 1], [0, 0], [0, np.nan]], dtype=float)
    s = np.array([[0.1, 0.8], [0.9, 0.3], [0.4, 0.2]])
    np.testing.assert_allclose(choose_thresholds(y, s), [0.5, 0.55])
    assert choose_thresholds(y, s, "youden")[0] == 0.5
    with pytest.raises(ValueError, match="unknown threshold method"):
        choose_thresholds(y, s, "accuracy")


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_contains_point_and_is_deterministic() -> None:
    y, s = _random_data(n=600, seed=9, nan_rate=0.05)
    a = bootstrap_ci(y, s, 0.5, n_boot=300, seed=11)
    b = bootstrap_ci(y, s, 0.5, n_boot=300, seed=11)
    c = bootstrap_ci(y, s, 0.5, n_boot=300, seed=12)
    point = auroc(y, s)
    for f in range(y.shape[1]):
        low, high = a["per_finding"]["auroc"][f]
        assert low <= point[f] <= high and low < high
    np.testing.assert_array_equal(a["per_finding"]["auroc"], b["per_finding"]["auroc"])
    np.testing.assert_array_equal(a["macro"]["f1"], b["macro"]["f1"])
    assert not np.array_equal(a["per_finding"]["auroc"], c["per_finding"]["auroc"])
    low, high = a["macro"]["auroc"]
    assert low <= macro_average(point) <= high
    low, high = a["micro"]["auroc"]
    assert low <= micro_metrics(y, s)["auroc"] <= high


def test_bootstrap_skips_one_class_resamples_and_n_boot_zero() -> None:
    rng = np.random.default_rng(1)
    y = np.zeros((200, 1))
    y[:2, 0] = 1  # two positives: many resamples draw neither
    s = rng.random((200, 1))
    ci = bootstrap_ci(y, s, n_boot=200, seed=0)
    assert 0 < ci["valid"]["auroc"][0] < 200
    assert np.isfinite(ci["per_finding"]["auroc"][0]).all()
    empty = bootstrap_ci(y, s, n_boot=0)
    assert np.isnan(empty["per_finding"]["auroc"]).all()


def test_bootstrap_batches_give_the_same_intervals(monkeypatch) -> None:
    """Resamples run in batches of count-weight matrices (speed is measured by benchmarks,
    not here): any batch size draws the same resamples and gives the same intervals."""
    import cxrtool.evaluate.metrics as metrics

    y, s = _random_data(n=300, f=4, seed=2, nan_rate=0.05)
    whole = bootstrap_ci(y, s, 0.5, n_boot=200, seed=0)
    monkeypatch.setattr(metrics, "_BATCH_ELEMENTS", 300 * 7)  # 7 resamples per batch
    batched = bootstrap_ci(y, s, 0.5, n_boot=200, seed=0)
    for part in ("per_finding", "macro", "micro"):
        for metric, values in whole[part].items():
            np.testing.assert_allclose(batched[part][metric], values, err_msg=f"{part} {metric}")


# --------------------------------------------------------------------------- evaluate()


def _evaluation_inputs(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 120
    y = (rng.random((n, 3)) < [0.3, 0.4, 0.2]).astype(float)
    score = np.clip(0.4 * y + 0.6 * rng.random((n, 3)), 0, 1)
    labels = tmp_path / "labels" / "labels.csv"
    labels.parent.mkdir()
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "patient_id", "Mass", "Effusion", "Nodule"])
        for i in range(n):
            w.writerow([f"imgs/case_{i:03d}.png", f"P{i}", *map(int, y[i])])
    preds = tmp_path / "run" / "predictions.csv"
    preds.parent.mkdir()
    with open(preds, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "Effusion", "Mass", "Hernia", "view_position", "error"])
        for i in range(n):
            w.writerow([f"/data/study/case_{i:03d}.png", f"{score[i, 1]:.6f}", f"{score[i, 0]:.6f}", "0.1", "PA", ""])
        w.writerow(["/data/study/broken.dcm", "", "", "", "", "cannot decode"])
        w.writerow(["/data/study/case_000.png", "0.5", "0.5", "0.1", "PA", ""])  # duplicate
        w.writerow(["/data/study/stranger.png", "0.5", "0.5", "0.1", "PA", ""])  # unmatched
        w.writerow(["/data/study/half.png", "", "", "0.1", "PA", ""])  # no probabilities of the evaluated findings
    return preds, labels, y, score


def test_evaluate_end_to_end(tmp_path: Path) -> None:
    preds, labels, y, score = _evaluation_inputs(tmp_path)
    out = tmp_path / "report"
    report = evaluate(preds, labels, thresholds={"Effusion": 0.4}, out_dir=out, n_boot=200, seed=0)
    assert isinstance(report, EvaluationReport)
    assert [r.finding for r in report.findings] == ["Effusion", "Mass"]  # prediction order
    assert sorted(p.name for p in out.iterdir()) == [
        "evaluation.csv", "evaluation.json", "pr_curves.png", "roc_curves.png"
    ]  # and no temp files left behind
    for name in ("roc_curves.png", "pr_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert report.matching["matched"] == 120
    assert report.matching["error_rows"] == 1
    assert report.matching["incomplete_rows"] == 1
    assert report.matching["unmatched_predictions"] == 1
    assert report.matching["duplicate_predictions"] == 1
    assert report.matching["labels_without_prediction"] == 0

    effusion, mass = report.findings
    assert effusion.threshold == 0.4 and mass.threshold == 0.5
    assert effusion.n == 120 and effusion.positives == int(y[:, 1].sum())
    assert effusion.auroc == pytest.approx(roc_auc_score(y[:, 1], np.round(score[:, 1], 6)), abs=1e-9)
    assert mass.auprc == pytest.approx(average_precision_score(y[:, 0], np.round(score[:, 0], 6)), abs=1e-9)
    assert effusion.ci["auroc"][0] <= effusion.auroc <= effusion.ci["auroc"][1]
    assert report.macro.auroc == pytest.approx((effusion.auroc + mass.auroc) / 2)
    assert report.thresholds == {"Effusion": 0.4, "Mass": 0.5}

    data = json.loads((out / "evaluation.json").read_text())
    assert data == json.loads(json.dumps(report.to_dict()))
    assert data["matching"]["matched"] == 120 and data["macro"]["finding"] == "macro"
    assert data["findings"][0]["ci"]["auroc"][0] <= data["findings"][0]["auroc"]
    assert any("not evaluated" in note and "Hernia" in note for note in data["notes"])
    with open(out / "evaluation.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["finding"] for r in rows] == ["Effusion", "Mass", "macro", "micro"]
    assert float(rows[0]["auroc"]) == pytest.approx(effusion.auroc, abs=1e-5)
    assert rows[0]["auroc_ci_low"] and rows[2]["threshold"] == ""

    from rich.console import Console

    console = Console(record=True, width=140)
    console.print(render_table(report))
    text = console.export_text()
    assert "Effusion" in text and "macro" in text and "AUROC" in text


def test_evaluate_defaults_to_predictions_folder_and_label_table(tmp_path: Path) -> None:
    preds, labels, y, _ = _evaluation_inputs(tmp_path)
    report = evaluate(preds, labels, n_boot=0)
    assert report.paths["json"] == preds.parent / "evaluation.json"
    assert all(p.is_file() for p in report.paths.values())
    assert math.isnan(report.findings[0].ci["auroc"][0])

    table = LabelTable(
        ("Mass",), [f"case_{i:03d}.png" for i in range(120)], [str(i) for i in range(120)],
        ["PA"] * 120, np.zeros((120, 1)), "generic",
    )
    one_class = evaluate(preds, table, out_dir=tmp_path / "t", n_boot=50)
    assert math.isnan(one_class.findings[0].auroc)
    assert any("no positive" in note for note in one_class.notes)
    assert json.loads((tmp_path / "t" / "evaluation.json").read_text())["findings"][0]["auroc"] is None


def test_evaluate_disambiguates_repeated_file_names(tmp_path: Path) -> None:
    labels = tmp_path / "train.csv"
    labels.write_text(
        "Path,Frontal/Lateral,AP/PA,Cardiomegaly\n"
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Frontal,AP,1.0\n"
        "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Frontal,AP,0.0\n"
        "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Frontal,AP,\n"
    )
    preds = tmp_path / "predictions.csv"
    preds.write_text(
        "file,Cardiomegaly\n"
        "/x/patient00001/study1/view1_frontal.jpg,0.9\n"
        "/x/patient00002/study1/view1_frontal.jpg,0.2\n"
        "/x/patient00003/study1/view1_frontal.jpg,0.1\n"
        "view1_frontal.jpg,0.5\n"
    )
    report = evaluate(preds, labels, n_boot=0)
    assert report.matching["matched"] == 3 and report.matching["ambiguous_predictions"] == 1
    assert report.findings[0].auroc == 1.0 and report.findings[0].n == 3


def test_evaluate_errors(tmp_path: Path) -> None:
    preds, labels, _, _ = _evaluation_inputs(tmp_path)
    no_overlap = tmp_path / "other.csv"
    no_overlap.write_text("file,Hernia\ncase_000.png,0.1\n")
    with pytest.raises(ValueError, match="no prediction column matches a label finding"):
        evaluate(no_overlap, labels, n_boot=0)
    no_match = tmp_path / "nomatch.csv"
    no_match.write_text("file,Mass\nzzz.png,0.1\n")
    with pytest.raises(ValueError, match="no prediction row matched"):
        evaluate(no_match, labels, n_boot=0)
    no_file = tmp_path / "nofile.csv"
    no_file.write_text("image,Mass\nzzz.png,0.1\n")
    with pytest.raises(ValueError, match="'file' column"):
        evaluate(no_file, labels, n_boot=0)
    with pytest.raises(FileNotFoundError):
        evaluate(tmp_path / "missing.csv", labels)


def test_thresholds_come_from_the_call_the_checkpoint_the_record_or_half(tmp_path: Path, make_checkpoint) -> None:
    """The precedence lives in the library, and the report says where its thresholds came from."""
    from cxrtool.io.records import RecordError

    preds, labels, _, _ = _evaluation_inputs(tmp_path)
    assert evaluate(preds, labels, n_boot=0).settings["thresholds_from"].startswith("0.5")
    checkpoint = make_checkpoint(("Effusion", "Mass"), thresholds={"Effusion": 0.2, "Mass": 0.7})
    from_card = evaluate(preds, labels, model=checkpoint, n_boot=0)  # (a table that does not say who made it)
    assert from_card.thresholds == {"Effusion": 0.2, "Mass": 0.7} and "checkpoint" in from_card.settings["thresholds_from"]
    given = evaluate(preds, labels, model=checkpoint, thresholds=0.45, n_boot=0)
    assert given.thresholds == {"Effusion": 0.45, "Mass": 0.45} and given.settings["thresholds_from"] == "given"
    recorded = preds.with_suffix(".json")
    recorded.write_text(json.dumps({"model": {"name": "m", "sha256": "ab" * 32}, "findings": ["Effusion", "Mass"],
                                    "thresholds": {"Effusion": 0.3, "Mass": 0.6}}))  # as the first release wrote it
    report = evaluate(preds, labels, n_boot=0)
    assert report.thresholds == {"Effusion": 0.3, "Mass": 0.6} and "recorded" in report.settings["thresholds_from"]
    with pytest.raises(RecordError, match="no model matches"):  # the table says model m made these rows
        evaluate(preds, labels, model=checkpoint, n_boot=0)
    recorded.write_text("{ not json")
    with pytest.raises(RecordError, match="recorded thresholds cannot be read"):
        evaluate(preds, labels, n_boot=0)
    recorded.write_text(json.dumps({"thresholds": {"Effusion": "high"}}))
    with pytest.raises(RecordError, match="not numbers"):
        evaluate(preds, labels, n_boot=0)


def test_a_chexpert_tree_predicted_by_cxrtool_is_evaluated_from_its_folder(tmp_path: Path, nih_dir, make_checkpoint) -> None:
    """Every study folder of a CheXpert/MIMIC-style tree names its image view1_frontal: rows
    join the labels on the path under the tree, not on the bare file name."""
    import shutil

    from typer.testing import CliRunner

    from cxrtool.cli import app

    root = tmp_path / "CheXpert-v1.0-small" / "valid"
    pngs = sorted((nih_dir / "images").glob("*.png"))[:6]
    lines = ["Path,Sex,Age,Frontal/Lateral,AP/PA,Cardiomegaly,Edema"]
    for i, png in enumerate(pngs):
        study = root / f"patient{i // 2:05d}" / f"study{i % 2 + 1}"
        study.mkdir(parents=True)
        shutil.copy(png, study / "view1_frontal.jpg")  # (a PNG under a JPEG's name: read by content)
        lines.append(f"CheXpert-v1.0-small/valid/patient{i // 2:05d}/study{i % 2 + 1}/view1_frontal.jpg,"
                     f"Male,60,Frontal,PA,{i % 2}.0,{(i // 2) % 2}.0")
    labels = tmp_path / "valid.csv"
    labels.write_text("\n".join(lines) + "\n")
    model = make_checkpoint(("Cardiomegaly", "Edema"))
    runner = CliRunner()
    assert runner.invoke(app, ["predict", str(root), "-m", str(model), "-j", "0"]).exit_code == 0
    report = evaluate(root, labels, n_boot=0)
    assert report.matching["matched"] == 6 and report.matching.get("ambiguous_predictions", 0) == 0
    assert [f.finding for f in report.findings] == ["Cardiomegaly", "Edema"]
    cli = runner.invoke(app, ["evaluate", str(root), "--labels", str(labels), "--bootstrap", "0", "--out", str(tmp_path)])
    assert cli.exit_code == 0, cli.output
    assert json.loads((tmp_path / "evaluation.json").read_text())["matching"]["matched"] == 6


def test_findings_spelled_differently_by_the_labels_are_matched_by_the_alias_table(tmp_path: Path) -> None:
    """An NIH/XRV-named model scored against CheXpert labels: Effusion is Pleural Effusion."""
    from cxrtool.registry import FINDING_ALIASES

    assert FINDING_ALIASES["Pleural Effusion"] == "Effusion"
    labels = tmp_path / "valid.csv"
    labels.write_text("Path,Frontal/Lateral,AP/PA,Pleural Effusion,Lung Lesion\n" + "".join(
        f"CheXpert-v1.0-small/valid/patient{i:05d}/study1/view1_frontal.jpg,Frontal,PA,{i % 2}.0,{(i // 2) % 2}.0\n"
        for i in range(8)))
    preds = tmp_path / "cxrtool_predictions.csv"
    preds.write_text("file,Effusion,Lung Lesion,Nodule\n" + "".join(
        f"/x/patient{i:05d}/study1/view1_frontal.jpg,{0.2 + 0.6 * (i % 2)},{0.1 * i},0.5\n" for i in range(8)))
    report = evaluate(preds, labels, n_boot=0)
    assert [f.finding for f in report.findings] == ["Effusion", "Lung Lesion"] and report.findings[0].auroc == 1.0
    assert report.matching["matched"] == 8


def test_the_paired_bootstrap_equals_a_hand_computation_on_a_tiny_table():
    from cxrtool.evaluate.compare import paired_bootstrap, seed_averaged

    targets = np.array([1.0, 0.0, 1.0, 1.0, 0.0])  # five test items (a hit rate: the metric is the mean of the scores)
    baseline = [np.array([1.0, 0, 0, 1, 0]), np.array([0.0, 0, 1, 1, 0])]  # two seeds
    variant = [np.array([1.0, 1, 1, 1, 0]), np.array([1.0, 0, 1, 1, 1])]

    def metric(t, s):
        return float(np.mean(s))

    found = paired_bootstrap(seed_averaged(metric, targets, baseline, variant), 5, n_boot=7, seed=3, level=0.5)
    # by hand: per item, the seed-averaged difference variant - baseline
    per_item = np.mean([v - b for b, v in zip(baseline, variant, strict=True)], axis=0)  # [0.5, 0.5, 0.5, 0, 0.5]
    assert found.estimate == pytest.approx(per_item.mean()) == pytest.approx(0.4)
    rng = np.random.default_rng(3)
    draws = [per_item[rng.integers(0, 5, 5)].mean() for _ in range(7)]
    assert (found.low, found.high) == pytest.approx(tuple(np.percentile(draws, [25, 75])))
    assert found.resamples == 7 and found.verdict() == ("better" if found.low > 0 else "no difference shown")
    # a NaN resample is left out and counted
    nan_once = iter([0.0] + [float("nan")] * 3 + [1.0] * 4)
    assert paired_bootstrap(lambda index: next(nan_once), 5, n_boot=7).resamples == 4


@pytest.mark.parametrize(("cell", "says"), [
    ("57.3", "is '57.3', not a probability in [0, 1] (percentages? divide by 100)"),
    ("-5", "is '-5', not a probability"),
    ("inf", "is 'inf', not a probability"),
    ("1e309", "is '1e309', not a probability"),
    ("nan", "is 'nan', not a probability"),
])
def test_impossible_probabilities_are_refused_naming_the_row(tmp_path: Path, cell: str, says: str) -> None:
    preds, labels, _, _ = _evaluation_inputs(tmp_path)
    rows = [line.split(",") for line in preds.read_text().splitlines()]
    for row in rows:
        if row[0] == "/data/study/case_007.png":
            row[1] = cell  # the Effusion column
    preds.write_text("\n".join(",".join(row) for row in rows) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"Effusion of /data/study/case_007.png {says}")):
        evaluate(preds, labels, n_boot=0)


def test_a_repeated_header_is_refused_and_repeated_label_rows_are_counted(tmp_path: Path) -> None:
    preds, labels, _, _ = _evaluation_inputs(tmp_path)
    doubled = tmp_path / "doubled.csv"
    header, *rest = preds.read_text().splitlines()
    doubled.write_text("\n".join([header.replace("Hernia", "Mass"), *rest]) + "\n")
    with pytest.raises(ValueError, match="the column 'Mass' appears twice in the header"):
        evaluate(doubled, labels, n_boot=0)
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join([*lines, lines[1], lines[2]]) + "\n")  # two images listed again
    report = evaluate(preds, labels, n_boot=0)
    assert report.matching["repeated_label_rows"] == 2 and report.matching["matched"] == 120
    assert any("2 label rows repeated an image listed before" in note for note in report.notes)
