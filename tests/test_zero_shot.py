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
    from test_predict import write_png

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
    onnx = runner.invoke(app, ["predict", str(study), "-m", str(dual_branch), "--runtime", "onnx", "--prompts", str(prompts)])
    assert onnx.exit_code == 2 and "use --runtime torch" in onnx.output
    bad = runner.invoke(app, ["predict", str(study), "-m", str(dual_branch), "--zero-shot", "just words"])
    assert bad.exit_code == 2 and "--zero-shot takes 'Finding: a description" in bad.output
