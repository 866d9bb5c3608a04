"""Test-time augmentation: the copies, their merge, one forward pass, and the record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cxrtool.errors import UsageError
from cxrtool.models.scoring import forward
from cxrtool.preprocess import TestTimeAugmentation

S = 20


def image_with_a_dot(y: int, x: int) -> torch.Tensor:
    batch = torch.full((1, 1, S, S), -2.0)  # background
    batch[0, 0, y, x] = 5.0
    return batch


def test_copies_are_the_study_zoomed_shifted_and_only_mirrored_when_asked():
    tta = TestTimeAugmentation("strong")
    assert len(tta.transforms()) == 7 and not any(m for *_, m in tta.transforms())
    assert len(TestTimeAugmentation("light", flip=True).transforms()) == 6
    batch = image_with_a_dot(6, 4)
    copies = tta.expand(batch, background=-2.0)
    assert copies.shape == (7, 1, S, S)
    torch.testing.assert_close(copies[0], batch[0])  # the first copy is the study itself
    # Shifts move the content by 5% of the side (1 pixel here), the way they say.
    peaks = [divmod(int(torch.argmax(copy)), S) for copy in copies[3:]]
    assert peaks == [(6, 5), (6, 3), (7, 4), (5, 4)]
    # Zooming out uncovers background, never anything new.
    out = copies[2, 0]
    assert torch.allclose(out[0], torch.tensor(-2.0)) and torch.allclose(out[:, 0], torch.tensor(-2.0))
    mirrored = TestTimeAugmentation("none", flip=True).expand(batch, background=-2.0)
    assert divmod(int(torch.argmax(mirrored[1])), S) == (6, S - 1 - 4)


def test_an_unknown_mode_is_refused():
    with pytest.raises(UsageError, match="unknown --tta 'heavy'; choose one of none, light, strong"):
        TestTimeAugmentation("heavy")
    assert TestTimeAugmentation().settings() == {}


class CountingNet(torch.nn.Module):
    """Logits = each input's mean and its top-left quarter's mean; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return torch.stack([x.mean(dim=(1, 2, 3)), x[:, :, : S // 2, : S // 2].mean(dim=(1, 2, 3))], dim=1)


def test_each_studys_copies_are_averaged_in_one_forward_pass():
    rng = np.random.default_rng(0)
    tensors = [rng.standard_normal((1, S, S)).astype(np.float32) for _ in range(3)]
    tta = TestTimeAugmentation("strong", flip=True)
    net = CountingNet()
    merged = forward(net, tensors, torch.device("cpu"), tta=tta, background=-1.0)
    assert net.batches == [3 * 14]  # every copy of every study, in one pass
    for i, tensor in enumerate(tensors):
        copies = tta.expand(torch.from_numpy(tensor[None]), background=-1.0)
        expected = torch.sigmoid(CountingNet()(copies)).mean(dim=0).numpy()
        np.testing.assert_allclose(merged[i], expected, rtol=1e-5)
    plain = forward(net, tensors, torch.device("cpu"))
    assert not np.allclose(plain, merged)


@pytest.fixture()
def study(tmp_path):
    from conftest import write_dicom, write_png

    folder = tmp_path / "study"
    folder.mkdir()
    write_dicom(folder / "a.dcm")
    write_png(folder / "b.png")
    return folder


def result_of(folder, name):
    return json.loads((folder / f"{name}.cxrtool.json").read_text())["results"][0]


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_predict_records_the_augmentation_and_a_change_is_done_again(study, make_checkpoint, runtime, tmp_path,
                                                                     monkeypatch):
    from cxrtool.models.runtime import onnx_installed
    from cxrtool.predict import predict

    if runtime == "onnx" and not onnx_installed():
        pytest.skip("ONNX Runtime not installed")
    monkeypatch.setenv("CXRTOOL_CACHE", str(tmp_path / "cache"))
    model = make_checkpoint()
    plain = predict([study], model=model, workers=0, runtime=runtime)
    assert plain.predicted == 2
    before = result_of(study, "a.dcm")
    assert before["settings"]["predict"] == {}
    light = TestTimeAugmentation("light")
    assert predict([study], model=model, workers=0, runtime=runtime, tta=light).predicted == 2  # not done yet
    after = result_of(study, "a.dcm")
    assert after["settings"]["predict"] == {"tta": "light", "flip": False, "copies": 3,
                                            "merge": "mean of the copies' probabilities"}
    assert after["findings"] != before["findings"]
    assert predict([study], model=model, workers=0, runtime=runtime, tta=light).skipped == 2
    if runtime == "onnx":  # the exported graph scores the same copies as PyTorch
        predict([study], model=model, workers=0, runtime="torch", tta=light, overwrite=True)
        torch_result = result_of(study, "a.dcm")
        for name, call in after["findings"].items():
            assert call["probability"] == pytest.approx(torch_result["findings"][name]["probability"], abs=1e-4)


def test_the_cli_takes_tta(study, make_checkpoint):
    from typer.testing import CliRunner

    from cxrtool.cli import app

    result = CliRunner().invoke(app, ["predict", str(study), "-m", str(make_checkpoint()), "-j", "0",
                                      "--tta", "strong", "--tta-flip", "--runtime", "torch"])
    assert result.exit_code == 0, result.output
    assert result_of(study, "b.png")["settings"]["predict"]["copies"] == 14
    bad = CliRunner().invoke(app, ["predict", str(study), "-m", str(make_checkpoint()), "--tta", "heavy"])
    assert bad.exit_code == 2


def test_explain_builds_on_predicts_tta_result_and_predict_again_keeps_the_maps(study, make_checkpoint, tmp_path):
    """predict --tta, explain, predict --tta again: the TTA probabilities and calls stay, the
    maps explain the calls predict made (not those of a plain pass), and stay with them."""
    import shutil

    from cxrtool.explain.run import ExplainSettings, explain
    from cxrtool.predict import predict

    light = TestTimeAugmentation("light")
    scratch = tmp_path / "scratch"
    shutil.copytree(study, scratch)
    base = make_checkpoint()
    predict([scratch], model=base, workers=0, runtime="torch")
    plain = result_of(scratch, "b.png")["findings"]
    predict([scratch], model=base, workers=0, runtime="torch", tta=light)
    augmented = result_of(scratch, "b.png")["findings"]
    # a threshold between the plain and the augmented probability: the two passes call it differently
    name = max(plain, key=lambda f: abs(plain[f]["probability"] - augmented[f]["probability"]))
    between = (plain[name]["probability"] + augmented[name]["probability"]) / 2
    assert abs(plain[name]["probability"] - augmented[name]["probability"]) > 1e-4
    model = make_checkpoint(thresholds={f: (between if f == name else 0.999) for f in plain}, name="between")

    assert predict([study], model=model, workers=0, runtime="torch", tta=light).predicted == 2
    predicted = result_of(study, "b.png")
    assert predicted["positive_findings"] == ([name] if augmented[name]["probability"] >= between else [])
    assert explain([study], model=model, workers=0, settings=ExplainSettings(method="gradcam")).predicted == 2
    explained = result_of(study, "b.png")
    assert explained["findings"] == predicted["findings"] and explained["settings"]["predict"] == predicted["settings"]["predict"]
    assert explained["explanations"]["calls"] == "predict"
    assert sorted(explained["explanations"]["findings"]) == predicted["positive_findings"]
    pictures = [f for entry in explained["explanations"]["findings"].values() for f in entry.get("files", {}).values()]
    assert all((study / f).is_file() for f in pictures)

    assert predict([study], model=model, workers=0, runtime="torch", tta=light).skipped == 2  # done: nothing redone
    assert predict([study], model=model, workers=0, runtime="torch", tta=light, overwrite=True).predicted == 2
    again = result_of(study, "b.png")
    assert again["findings"] == predicted["findings"] and again["explanations"] == explained["explanations"]
    assert all((study / f).is_file() for f in pictures)
    assert explain([study], model=model, workers=0, settings=ExplainSettings(method="gradcam")).skipped == 2

    # predict with other settings changes the probabilities: the maps of the old ones go, and
    # explain then builds on the new result
    predict([study], model=model, workers=0, runtime="torch")
    assert "explanations" not in result_of(study, "b.png") and not any((study / f).exists() for f in pictures)
    explain([study], model=model, workers=0, settings=ExplainSettings(method="gradcam"))
    redone = result_of(study, "b.png")
    assert redone["settings"]["predict"] == {} and redone["explanations"]["calls"] == "predict"
    assert all(redone["findings"][f]["probability"] == plain[f]["probability"] for f in plain)


def test_explain_without_a_stored_result_scores_the_study_itself(study, make_checkpoint):
    from cxrtool.explain.run import ExplainSettings, explain

    assert explain([study], model=make_checkpoint(), workers=0, settings=ExplainSettings(method="gradcam")).predicted == 2
    result = result_of(study, "a.dcm")
    assert result["settings"]["predict"] == {} and result["explanations"]["calls"] == "explain"
