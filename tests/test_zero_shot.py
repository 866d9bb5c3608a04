"""Zero-shot findings at predict time: a dual-branch model scores described findings it never trained on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cxrtool.cli import app
from cxrtool.models.text import encoder_installed

pytestmark = pytest.mark.skipif(not encoder_installed(), reason="the sentence encoder (cxrtool[text]) is not installed")
FINDINGS = ["Effusion", "Nodule"]


@pytest.fixture(scope="module")
def dual_branch(tmp_path_factory) -> Path:
    import torch

    from cxrtool.models.checkpoint import ModelCard, save_checkpoint
    from cxrtool.models.network import CXRClassifier
    from cxrtool.models.text import ENCODER_DIM, ENCODER_NAME, prompt_pairs, training_prompts
    from cxrtool.preprocess import Preprocessing

    torch.manual_seed(0)
    model = CXRClassifier("resnet18", FINDINGS, text_dim=ENCODER_DIM)
    prompts = training_prompts(FINDINGS)
    model.text.prompts.copy_(torch.from_numpy(prompt_pairs(prompts)))
    card = ModelCard("resnet18", FINDINGS, Preprocessing(input_size=64).to_dict(), name="dual",
                     text={"encoder": ENCODER_NAME, "dim": ENCODER_DIM, "prompts": prompts})
    return save_checkpoint(tmp_path_factory.mktemp("dual") / "dual.safetensors", model, card)


@pytest.fixture()
def study(tmp_path):
    from conftest import write_png

    folder = tmp_path / "study"
    folder.mkdir()
    for i in range(3):
        write_png(folder / f"s{i}.png", seed=i)
    return folder


def test_a_described_finding_is_scored_and_marked_zero_shot(dual_branch, study, tmp_path, monkeypatch):
    import torch

    from cxrtool.models.checkpoint import load_checkpoint
    from cxrtool.models.text import encode, negative_prompt
    from cxrtool.preprocess import Preprocessing, prepare

    monkeypatch.setenv("CXRTOOL_CACHE", str(tmp_path / "cache"))
    args = ["predict", str(study), "-m", str(dual_branch), "-j", "0",
            "--zero-shot", "Pneumomediastinum: streaks of air outlining the mediastinum"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((study / "s1.png.cxrtool.json").read_text())["results"][0]
    call = record["findings"]["Pneumomediastinum"]
    assert call["zero_shot"] is True and call["calibrated"] is False and call["threshold"] == 0.5
    assert "zero_shot" not in record["findings"]["Effusion"]
    assert record["settings"]["predict"]["zero_shot"]["Pneumomediastinum"]["negative"] == ["no pneumomediastinum"]
    # CheXzero's rule by hand: the softmax over the positive and the negative prompt.
    from cxrtool.io.studies import read_study

    model, card = load_checkpoint(dual_branch)
    tensor, _ = prepare(read_study(study / "s1.png").pixels, Preprocessing.from_dict(card.preprocessing))
    with torch.no_grad():
        image = model.project(torch.from_numpy(tensor[None]))[0].numpy()
    positive, negative = encode(["Pneumomediastinum: streaks of air outlining the mediastinum"])[0], \
        encode([negative_prompt("Pneumomediastinum")])[0]
    scale = float(model.text.logit_scale.detach().exp())
    s_pos, s_neg = scale * image @ positive, scale * image @ negative
    assert call["probability"] == pytest.approx(np.exp(s_pos) / (np.exp(s_pos) + np.exp(s_neg)), abs=1e-4)
    # The table has its column; the index says it is zero-shot; the prompt embeddings are cached.
    header = (study / "cxrtool_predictions.csv").read_text().splitlines()[0].split(",")
    assert "Pneumomediastinum" in header
    index = json.loads((study / "cxrtool_predictions.json").read_text())
    assert next(iter(index["models"].values()))["zero_shot"] == ["Pneumomediastinum"]
    assert list((tmp_path / "cache" / "prompts").glob("*.npy"))
    # The same prompts are done; other prompts are not.
    assert "0 predicted, 3 already done" in CliRunner().invoke(app, args).output
    assert "3 predicted" in CliRunner().invoke(app, [*args[:-1], "Pneumomediastinum: air around the heart"]).output


def test_a_prompts_file_and_what_is_refused(dual_branch, study, make_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("Goiter:\n  positive: [an enlarged thyroid widening the upper mediastinum]\n"
                       "  negative: [a normal thyroid]\nBulla: a thin-walled air space in the lung\n")
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(study), "-m", str(dual_branch), "-j", "0", "--prompts", str(prompts)])
    assert result.exit_code == 0, result.output
    record = json.loads((study / "s0.png.cxrtool.json").read_text())["results"][0]
    assert [name for name, call in record["findings"].items() if call.get("zero_shot")] == ["Goiter", "Bulla"]
    plain = runner.invoke(app, ["predict", str(study), "-m", str(make_checkpoint()), "-j", "0", "--prompts", str(prompts)])
    assert plain.exit_code == 2 and "need a dual-branch model" in plain.output
    trained = runner.invoke(app, ["predict", str(study), "-m", str(dual_branch), "--zero-shot", "Nodule: a small round opacity"])
    assert trained.exit_code == 2 and "a finding the model was trained on" in trained.output
    spelled = runner.invoke(app, ["predict", str(study), "-m", str(dual_branch), "--zero-shot", "pleural effusion: fluid"])
    assert spelled.exit_code == 2 and "a finding the model was trained on" in spelled.output  # Effusion, spelled otherwise
    onnx = runner.invoke(app, ["predict", str(study), "-m", str(dual_branch), "--runtime", "onnx", "--prompts", str(prompts)])
    assert onnx.exit_code == 2 and "use --runtime torch" in onnx.output
    bad = runner.invoke(app, ["predict", str(study), "-m", str(dual_branch), "--zero-shot", "just words"])
    assert bad.exit_code == 2 and "--zero-shot takes 'Finding: a description" in bad.output


def test_a_model_without_a_text_branch_is_refused_before_any_prompt_is_embedded(make_checkpoint, study, tmp_path,
                                                                                 monkeypatch):
    import cxrtool.models.text as text

    monkeypatch.setenv("CXRTOOL_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(text, "encoder_installed", lambda: False)  # embedding now would fail with another reason
    plain = CliRunner().invoke(app, ["predict", str(study), "-m", str(make_checkpoint()), "-j", "0",
                                     "--zero-shot", "Goiter: an enlarged thyroid"])
    assert plain.exit_code == 2 and "need a dual-branch model" in plain.output, plain.output


def test_a_bundle_scores_a_prompt_with_its_dual_branch_members(dual_branch, make_checkpoint, tmp_path, monkeypatch):
    """The zero-shot finding is merged over the members of the study's route that have a text
    branch (a route without one leaves it out), marked in the sidecar, listed in the index."""
    from conftest import write_dicom

    from cxrtool.io.outputs import FOLDER_JSON

    monkeypatch.setenv("CXRTOOL_CACHE", str(tmp_path / "cache"))
    study = tmp_path / "mixed"
    study.mkdir()
    write_dicom(study / "pa.dcm", view="PA")
    write_dicom(study / "lat.dcm", view="LL")
    plain = make_checkpoint(("Effusion", "Cardiomegaly"), name="plain")
    bundle = tmp_path / "bundle.yaml"
    bundle.write_text(f"name: with-text\nmerge: rank\nmembers:\n  dual: {dual_branch}\n  plain: {plain}\n"
                      "routes:\n  PA: [dual, plain]\n  default: [plain]\n")
    prompt = "Pneumomediastinum: streaks of air outlining the mediastinum"
    runner = CliRunner()
    # rank needs each member's validation scores: calibrate on labels first (the zero-shot finding needs none).
    labels = tmp_path / "labels.csv"
    labels.write_text("path,Effusion,Nodule,Cardiomegaly\npa.dcm,1,0,0\nlat.dcm,0,1,1\n")
    result = runner.invoke(app, ["models", "calibrate", str(bundle), "--labels", str(labels), "--images", str(study), "-j", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["predict", str(study), "-m", str(bundle), "-j", "0", "--zero-shot", prompt])
    assert result.exit_code == 0, result.output
    pa = json.loads((study / "pa.dcm.cxrtool.json").read_text())["results"][0]
    call = pa["findings"]["Pneumomediastinum"]
    assert call["zero_shot"] is True and call["calibrated"] is False and call["threshold"] == 0.5
    ensemble = pa["ensemble"]
    assert ensemble["merge"] == "rank" and ensemble["zero_shot_merge"] == "mean"
    assert "Pneumomediastinum" not in ensemble["members"]["plain"]["probabilities"]
    assert call["probability"] == pytest.approx(ensemble["members"]["dual"]["probabilities"]["Pneumomediastinum"], abs=2e-6)
    lateral = json.loads((study / "lat.dcm.cxrtool.json").read_text())["results"][0]
    assert "Pneumomediastinum" not in lateral["findings"]  # its route has no text branch
    index = json.loads((study / FOLDER_JSON).read_text())
    assert next(iter(index["models"].values()))["zero_shot"] == ["Pneumomediastinum"]
    # Refused: a bundle without a dual-branch member, and a prompt for a finding of the bundle.
    no_text = tmp_path / "no_text.yaml"
    no_text.write_text(f"members:\n  plain: {plain}\nroutes:\n  default: [plain]\n")
    refused = runner.invoke(app, ["predict", str(study), "-m", str(no_text), "--zero-shot", prompt])
    assert refused.exit_code == 2 and "no member of this bundle has a text branch" in refused.output
    trained = runner.invoke(app, ["predict", str(study), "-m", str(bundle), "--zero-shot", "Cardiomegaly: a big heart"])
    assert trained.exit_code == 2 and "is a finding of the bundle" in trained.output


@pytest.mark.slow
def test_a_held_out_phantom_finding_scored_from_its_description_beats_chance(tmp_path, monkeypatch):
    """Train a dual-branch model on phantoms without Edema, then score Edema from its
    description alone: the AUROC on other phantoms must clear chance by two null standard
    errors (a fixed seed; the run is deterministic on one machine)."""
    from cxrtool.data.labels import read_labels
    from cxrtool.data.phantom import generate_cohort
    from cxrtool.evaluate.classification import auroc

    monkeypatch.setenv("CXRTOOL_CACHE", str(tmp_path / "cache"))
    train_set = generate_cohort(tmp_path / "train", n_images=480, size=96, seed=0, write_masks=False)
    test_set = generate_cohort(tmp_path / "test", n_images=200, size=96, seed=10_000, first_patient_id=90_001,
                               write_masks=False)
    seen = [f for f in read_labels(train_set.data_entry_csv, require_images=False).findings if f != "Edema"]
    runner = CliRunner()
    result = runner.invoke(app, [
        "train", str(train_set.data_entry_csv), "--images", str(tmp_path / "train" / "images"), "--out", str(tmp_path / "run"),
        "--preset", "dual-branch", "--findings", ",".join(seen), "--arch", "resnet18", "--input-size", "64",
        "--epochs", "4", "-b", "32", "-j", "0", "--device", "cpu", "--seed", "0", "--set", "lr=0.003"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [
        "predict", str(tmp_path / "test" / "images"), "-m", str(tmp_path / "run" / "model.safetensors"), "-j", "0",
        "--zero-shot", "Edema: fluid in the lung interstitium and alveoli, with vascular congestion"])
    assert result.exit_code == 0, result.output

    truth = read_labels(test_set.data_entry_csv, require_images=False)
    scores, labels = [], []
    for image, target in zip(truth.images, truth.targets[:, truth.findings.index("Edema")], strict=True):
        record = json.loads((tmp_path / "test" / "images" / f"{Path(image).name}.cxrtool.json").read_text())["results"][0]
        call = record["findings"]["Edema"]
        assert call["zero_shot"] is True and call["calibrated"] is False
        scores.append(call["probability"])
        labels.append(target)
    labels = np.asarray(labels)
    positives, negatives = int(labels.sum()), int((labels == 0).sum())
    assert positives >= 10, positives
    null_se = np.sqrt((positives + negatives + 1) / (12 * positives * negatives))  # AUROC's sd under no signal
    value = auroc(labels, np.asarray(scores))
    print(f"held-out Edema, zero-shot AUROC {value:.3f} ({positives} positives; chance 0.5, null sd {null_se:.3f})")
    assert value > 0.5 + 2 * null_se, (value, null_se)
