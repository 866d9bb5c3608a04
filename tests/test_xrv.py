"""TorchXRayVision's classifiers as cxrtool models: imported once, then exactly XRV's outputs.

No network: the weight files are made here, offline, with XRV's own model classes and
seeded weights (batch-norm statistics from real radiographs, so that the logits are of
order one and every pixel of preprocessing matters), and saved the way XRV publishes them:
the DenseNet as a pickled module, the ResNet-50 as a state dict, under XRV's file names.
Being made here, the DenseNet files are not XRV's published files: they are imported with
--trust-pickle, which lets a pickle build only the classes a weights file needs.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cxrtool.cli import app

xrv = pytest.importorskip("torchxrayvision", reason="TorchXRayVision (cxrtool[xrv], in the test extra) is not installed")
runner = CliRunner()
DENSE, RESNET = "densenet121-res224-nih", "resnet50-res512-all"


def xrv_input(path: Path, size: int) -> torch.Tensor:
    """XRV's own documented pipeline: its reading and normalisation, centre crop, resize."""
    import torchvision

    image = xrv.utils.load_image(str(path))
    transform = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(size)])
    return torch.from_numpy(transform(image))[None]


def _settle_batch_norm(model: torch.nn.Module, batch: torch.Tensor) -> None:
    """Running statistics from real radiographs: activations, and logits, of order one."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over what is seen
    model.train()
    with torch.no_grad():
        model(batch)
    model.eval()


def _file_name(name: str) -> str:
    return os.path.basename(xrv.models.model_urls[name]["weights_url"])


@pytest.fixture(scope="module")
def nih_pngs(nih_dir: Path) -> list[Path]:
    return sorted((nih_dir / "images").glob("*.png"))[:6]


@pytest.fixture(scope="module")
def xrv_cache(tmp_path_factory, nih_pngs) -> Path:
    """XRV-format files of a DenseNet-121 (NIH set) and a ResNet-50 (512 px set), offline."""
    import torchvision

    folder = tmp_path_factory.mktemp("xrv_cache")
    torch.manual_seed(0)
    dense = xrv.models.DenseNet(num_classes=18)
    _settle_batch_norm(dense, torch.cat([xrv_input(p, 224) for p in nih_pngs]))
    torch.save(dense, folder / _file_name(DENSE))  # a whole pickled module, as XRV's DenseNet files are
    resnet = torchvision.models.resnet50(num_classes=18, weights=None)
    resnet.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)  # as XRV patches it
    _settle_batch_norm(resnet, torch.cat([xrv_input(p, 512) for p in nih_pngs[:3]]))
    torch.save(resnet.state_dict(), folder / _file_name(RESNET))  # a state dict, as XRV's ResNet file is
    return folder


def _xrv_model(name: str, cache: Path) -> torch.nn.Module:
    model_class = xrv.models.DenseNet if name.startswith("densenet") else xrv.models.ResNet
    return model_class(weights=name, cache_dir=str(cache))


def _import(name: str, cache: Path, out: Path, *, trust: bool = True):
    return runner.invoke(app, ["models", "import", f"xrv:{name}", "--weights", str(cache / _file_name(name)),
                               "--out", str(out), *(["--trust-pickle"] if trust else [])])


def test_the_weights_are_of_order_one(xrv_cache, nih_pngs):
    model = _xrv_model(DENSE, xrv_cache)
    model.op_threshs = None
    with torch.no_grad():
        logits = model(torch.cat([xrv_input(p, 224) for p in nih_pngs]))
    assert 0.05 < float(logits.std()) < 10, "a parity test on saturated outputs would prove nothing"


@pytest.mark.parametrize("name", [DENSE, RESNET])
def test_import_then_predict_gives_xrvs_own_calibrated_probabilities(name, xrv_cache, nih_pngs, tmp_path):
    checkpoint = tmp_path / f"{name}.safetensors"
    images = nih_pngs if name == DENSE else nih_pngs[:2]  # (ResNet-50 at 512 px: a second a study here)
    imported = _import(name, xrv_cache, checkpoint)
    assert imported.exit_code == 0, imported.output
    digest = __import__("hashlib").sha256((xrv_cache / _file_name(name)).read_bytes()).hexdigest()
    assert digest in imported.output
    assert ("unpickled here" in imported.output) == name.startswith("densenet")  # a state dict needs no unpickling
    result = runner.invoke(app, ["predict", *map(str, images), "-m", str(checkpoint), "--out", str(tmp_path / "out"),
                                 "-j", "0", "--jsonl"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    records = {Path(record["path"]).name: record for record in map(json.loads, lines)}
    model = _xrv_model(name, xrv_cache)
    labels = list(model.targets)
    for png in images:
        with torch.no_grad():
            expected = model(xrv_input(png, model.input_resolution))[0].numpy()
        findings = records[png.name]["findings"]
        assert findings, png
        for finding, call in findings.items():
            assert call["probability"] == pytest.approx(float(expected[labels.index(finding)]), abs=1e-4), (png.name, finding)
            assert call["positive"] == (call["probability"] >= 0.5) and call["threshold"] == 0.5
            assert 0.0 <= call["raw_probability"] <= 1.0
        assert records[png.name]["calibration"]["method"] == "xrv_operating_points"
    if name == DENSE:  # evaluate scores it against CheXpert-named labels through the alias table
        labels = tmp_path / "valid.csv"
        labels.write_text("Path,Frontal/Lateral,AP/PA,Pleural Effusion,Cardiomegaly,Lung Lesion\n" + "".join(
            f"images/{png.name},Frontal,PA,{i % 2}.0,{(i // 2) % 2}.0,0.0\n" for i, png in enumerate(images)))
        scored = runner.invoke(app, ["evaluate", str(tmp_path / "out"), "--labels", str(labels), "--out", str(tmp_path / "eval"),
                                     "--bootstrap", "0"])
        assert scored.exit_code == 0, scored.output
        report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
        assert [row["finding"] for row in report["findings"]] == ["Effusion", "Cardiomegaly"]
        assert report["matching"]["matched"] == len(images)


def test_the_imported_card_says_what_it_is(xrv_cache, tmp_path):
    from cxrtool.models.checkpoint import load_checkpoint, read_card

    checkpoint = tmp_path / "resnet.safetensors"
    assert _import(RESNET, xrv_cache, checkpoint).exit_code == 0
    card = read_card(checkpoint)
    table = xrv.models.model_urls[RESNET]
    kept = [label for label, point in zip(table["labels"], table["op_threshs"], strict=True) if label and np.isfinite(point)]
    assert card.findings == kept and "Lung Lesion" not in card.findings  # no operating point: not a finding
    assert card.source["weights"] == RESNET and card.source["file"] == _file_name(RESNET) and len(card.source["sha256"]) == 64
    assert card.source["library_version"] == xrv.__version__ and card.source["licence"]
    assert card.calibration["operating_points"]["Effusion"] == pytest.approx(table["op_threshs"][table["labels"].index("Effusion")])
    assert card.preprocessing == {"input_size": 512, "mean": 0.5, "std": 1 / 2048, "resize": "center_crop", "resample": "skimage"}
    network, _ = load_checkpoint(checkpoint)  # an ordinary timm backbone: nothing unpickled here
    assert type(network.backbone).__module__.startswith("timm")
    shown = runner.invoke(app, ["models", str(checkpoint)])
    assert shown.exit_code == 0 and "torchxrayvision" in shown.output and "operating point" in shown.output


def test_explain_maps_an_imported_model_on_the_radiographs_own_grid(xrv_cache, dicom_dir, tmp_path):
    """A 2140 x 1760 radiograph, centre-cropped to 1760 x 1760 for the model: the maps come
    back on the whole radiograph, zero on the cropped-off rows."""
    checkpoint = tmp_path / "dense.safetensors"
    assert _import(DENSE, xrv_cache, checkpoint).exit_code == 0
    study = dicom_dir / "wg04" / "RG2_UNC.dcm"
    out = tmp_path / "explained"
    result = runner.invoke(app, ["explain", str(study), "-m", str(checkpoint), "-f", "Effusion", "--map-format", "npy",
                                 "--out", str(out), "-j", "0"])
    assert result.exit_code == 0, result.output
    (sidecar,) = out.glob("*.cxrtool.json")
    (result_record,) = json.loads(sidecar.read_text())["results"]
    explanations = result_record["explanations"]
    assert explanations["layer"] == "backbone.features.norm5"
    entry = explanations["findings"]["Effusion"]
    cam = np.load(out / entry["files"]["map"])
    assert cam.shape == (2140, 1760)
    top = (2140 - 1760) // 2
    assert not cam[:top - 1].any() and not cam[top + 1760 + 1:].any() and cam[top + 1 : top + 1759].any()
    for region in entry["regions"]:
        x, y, w, h = region["box"]
        assert top <= y and y + h <= top + 1760
    # PyRadiomics features of those regions, on the radiograph's own pixels
    params = tmp_path / "params.yaml"
    params.write_text("imageType:\n  Original: {}\nfeatureClass:\n  firstorder:\n  shape2D:\nsetting:\n  binWidth: 0.02\n")
    mistaken = runner.invoke(app, ["radiomics", str(out), "--from-cam"])  # explain's --out folder as if it held studies
    assert mistaken.exit_code == 2 and "give it as --explanations DIR" in mistaken.output
    measured = runner.invoke(app, ["radiomics", "--explanations", str(out), "--params", str(params), "--workers", "1"])
    assert measured.exit_code == 0, measured.output
    with open(out / "cxrtool_radiomics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(entry["regions"]) > 0 and all(row["status"] == "ok" and row["finding"] == "Effusion" for row in rows)


def test_import_from_xrvs_cache_and_bad_requests(xrv_cache, tmp_path):
    home = tmp_path / "home"
    cache = home / ".torchxrayvision" / "models_data"
    cache.mkdir(parents=True)
    (cache / _file_name(DENSE)).symlink_to(xrv_cache / _file_name(DENSE))
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1"}
    found = subprocess.run([sys.executable, "-m", "cxrtool", "models", "import", f"xrv:{DENSE}", "--trust-pickle", "--out",
                            str(tmp_path / "m.safetensors")], capture_output=True, text=True, env=env, timeout=240)
    assert found.returncode == 0, found.stderr
    assert str(cache) in found.stderr and "14 findings" in found.stderr
    another = runner.invoke(app, ["models", "import", f"xrv:{DENSE}", "--weights", str(xrv_cache / _file_name(RESNET)),
                                  "--out", str(tmp_path / "x.safetensors")])
    assert another.exit_code == 2 and f"TorchXRayVision's file of xrv:{RESNET}, not of xrv:{DENSE}" in another.output
    renamed = tmp_path / "weights.pt"  # the sets' DenseNets share a shape: a renamed file is imported, with a note
    renamed.symlink_to(xrv_cache / _file_name(RESNET))
    wrong = runner.invoke(app, ["models", "import", f"xrv:{DENSE}", "--weights", str(renamed), "--out", str(tmp_path / "x.safetensors")])
    assert wrong.exit_code == 2 and "these are not densenet121-res224-nih weights" in wrong.output
    assert "weights.pt is not TorchXRayVision's name for" in wrong.output
    assert not (tmp_path / "x.safetensors").exists()
    unknown = runner.invoke(app, ["models", "import", "xrv:densenet999", "--out", str(tmp_path / "y.safetensors")])
    assert unknown.exit_code == 2 and "densenet121-res224-all" in unknown.output
    other = runner.invoke(app, ["models", "import", "hub:densenet", "--out", str(tmp_path / "z.safetensors")])
    assert other.exit_code == 2 and "expected xrv:NAME" in other.output
    listed = runner.invoke(app, ["models", "--available"])
    assert listed.exit_code == 0 and "xrv:resnet50-res512-all" in listed.output and "Enlarged Cardiomediastinum" in listed.output


def test_a_download_through_xrv_and_files_that_are_not_weights(xrv_cache, tmp_path, monkeypatch):
    """No network here: XRV's own download function is the one piece replaced, by a copy of
    the offline file (then by a failure, then by a download cut short)."""
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # an empty XRV cache
    asked: list[str] = []

    def download(url, path):
        asked.append(url)
        shutil.copy(xrv_cache / _file_name(DENSE), path)

    monkeypatch.setattr(xrv.utils, "download", download)
    done = runner.invoke(app, ["models", "import", f"xrv:{DENSE}", "--trust-pickle", "--out", str(tmp_path / "a.safetensors")])
    assert done.exit_code == 0, done.output
    assert asked == [xrv.models.model_urls[DENSE]["weights_url"]] and "downloading" in done.output
    cached = tmp_path / "home" / ".torchxrayvision" / "models_data" / _file_name(DENSE)
    cached.unlink()

    def no_network(url, path):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(xrv.utils, "download", no_network)
    failed = runner.invoke(app, ["models", "import", f"xrv:{DENSE}", "--out", str(tmp_path / "b.safetensors")])
    assert failed.exit_code == 2 and "could not download" in failed.output and "--weights FILE" in failed.output
    cached.write_bytes((xrv_cache / _file_name(DENSE)).read_bytes()[:100_000])  # an interrupted download
    partial = runner.invoke(app, ["models", "import", f"xrv:{DENSE}", "--trust-pickle", "--out", str(tmp_path / "c.safetensors")])
    assert partial.exit_code == 2 and "cut short or corrupt?" in partial.output and "delete it to download it again" in partial.output
    for content in (b"hello", b""):
        (tmp_path / "junk.pt").write_bytes(content)
        junk = runner.invoke(app, ["models", "import", f"xrv:{DENSE}", "--weights", str(tmp_path / "junk.pt"),
                                   "--out", str(tmp_path / "d.safetensors")])
        assert junk.exit_code == 2 and "not a readable PyTorch weights file" in junk.output, junk.output
    assert not any(tmp_path.glob("[bcd].safetensors"))


def test_without_torchxrayvision_the_import_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchxrayvision", None)  # as if not installed
    result = runner.invoke(app, ["models", "import", f"xrv:{DENSE}", "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 2 and 'pip install "cxrtool[xrv]"' in result.output
    listed = runner.invoke(app, ["models", "--available"])
    assert listed.exit_code == 0 and "install TorchXRayVision" in listed.output


def test_fine_tuning_an_imported_model(xrv_cache, nih_pngs, tmp_path):
    """--init from an imported XRV model: XRV's preprocessing and backbone carry over, the
    findings it has keep their rows, and the new card names its parent."""
    from cxrtool.models.checkpoint import file_sha256, read_card

    checkpoint = tmp_path / "dense.safetensors"
    assert _import(DENSE, xrv_cache, checkpoint).exit_code == 0
    labels = tmp_path / "labels.csv"
    labels.write_text("path,patient_id,Effusion,Ring\n" + "".join(
        f"{png},p{i},{i % 2},{(i // 2) % 2}\n" for i, png in enumerate(nih_pngs)))
    run = tmp_path / "tuned"
    result = runner.invoke(app, ["train", str(labels), "--init", str(checkpoint), "--out", str(run), "-b", "2", "-j", "0",
                                 "--epochs", "1", "--device", "cpu", "--set", "max_train_batches=1", "--set", "val_fraction=0.34"])
    assert result.exit_code == 0, result.output
    card = read_card(run / "model.safetensors")
    assert card.architecture == "densenet121" and card.preprocessing["resize"] == "center_crop"
    assert card.findings == ["Effusion", "Ring"] and not card.calibration  # thresholds chosen on validation instead
    assert card.training["init"] == {"checkpoint": str(checkpoint), "sha256": file_sha256(checkpoint), "name": "xrv-" + DENSE,
                                     "findings_kept": ["Effusion"], "findings_new": ["Ring"]}


# --- pickles that are not weights: refused, with or without --trust-pickle (issue 23) ---


class _Command:
    """What an attacker pickles: unpickling it calls ``call(*args)``."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _stack_global_in_disguise(module: str, name: str, argument: str) -> bytes:
    """A protocol-4 pickle calling module.name(argument), the two names separated by a
    MARK/POP_MARK pair, which changes nothing on the unpickler's stack: a reading of the
    opcodes that follows only adjacent strings cannot tell what it imports."""
    def text(value: str) -> bytes:
        return pickle.SHORT_BINUNICODE + bytes([len(value)]) + value.encode()

    return (pickle.PROTO + b"\x04" + text(module) + pickle.MARK + pickle.POP_MARK + text(name) + pickle.STACK_GLOBAL
            + text(argument) + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)


def _import_file(path: Path, out: Path, *flags: str):
    return runner.invoke(app, ["models", "import", f"xrv:{DENSE}", "--weights", str(path), "--out", str(out), *flags])


def _one_line_error(output: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith("error:")]
    return line


@pytest.mark.parametrize("trust", [False, True])
@pytest.mark.parametrize(("payload", "named"), [
    pytest.param(lambda: _Command(os.system, "touch PWNED"), "os.system", id="os.system"),
    pytest.param(lambda: _Command(subprocess.Popen, ["touch", "PWNED"]), "subprocess.Popen", id="subprocess.Popen"),
    pytest.param(lambda: _Command(eval, "__import__('os').system('touch PWNED')"), "builtins.eval", id="builtins.eval"),
    pytest.param(lambda: {"features.conv0.weight": torch.zeros(1), "x": _Command(os.system, "touch PWNED")}, "os.system",
                 id="os.system-in-torch-zip"),
])
def test_a_pickle_that_runs_a_command_is_refused_and_runs_nothing(payload, named, trust, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where "touch PWNED" would write
    evil = tmp_path / "evil.pt"
    if isinstance(payload(), dict):  # hidden in torch's own zip format, beside a tensor
        torch.save(payload(), evil)
    else:
        evil.write_bytes(pickle.dumps(payload(), protocol=2))
    result = _import_file(evil, tmp_path / "x.safetensors", *(["--trust-pickle"] if trust else []))
    assert not (tmp_path / "PWNED").exists(), "the pickle ran its command"
    assert result.exit_code == 2, result.output
    assert _one_line_error(result.output) == f"error: {evil}: refused: the pickle asks for {named}, which a weights file never needs"
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")  # torch's weights_only reader, tried first
def test_the_unpickler_itself_refuses_what_a_reading_of_the_opcodes_misses(tmp_path, monkeypatch):
    """Even when a pickle hides what it imports from the opcode reading, a trusted file is
    unpickled with only the admitted names; and an admitted module class is never called
    (XRV's DenseNet(weights=..., cache_dir=...) would download and unpickle a file)."""
    monkeypatch.chdir(tmp_path)
    hidden = tmp_path / "hidden.pt"
    hidden.write_bytes(_stack_global_in_disguise("posix", "system", "touch PWNED"))
    untrusted = _import_file(hidden, tmp_path / "x.safetensors")
    assert not (tmp_path / "PWNED").exists(), "the pickle ran its command"
    assert untrusted.exit_code == 2 and "--trust-pickle" in _one_line_error(untrusted.output)
    trusted = _import_file(hidden, tmp_path / "x.safetensors", "--trust-pickle")
    assert not (tmp_path / "PWNED").exists(), "the pickle ran its command"
    assert trusted.exit_code == 2
    assert _one_line_error(trusted.output) == f"error: {hidden}: refused: the pickle asks for os.system, which a weights file never needs"
    called = tmp_path / "called.pt"
    called.write_bytes(pickle.dumps(_Command(xrv.models.DenseNet, 32, (6, 12, 24, 16)), protocol=2))
    result = _import_file(called, tmp_path / "x.safetensors", "--trust-pickle")
    assert result.exit_code == 2
    assert _one_line_error(result.output) == (f"error: {called}: refused: the pickle calls torchxrayvision.models.DenseNet, "
                                              "which a weights file never needs")
    patched = tmp_path / "patched.pt"  # a class's own attributes set by the pickle (BUILD on Conv2d, not on a Conv2d)
    patched.write_bytes(pickle.PROTO + b"\x02" + pickle.GLOBAL + b"torch.nn.modules.conv\nConv2d\n" + pickle.NONE
                        + pickle.EMPTY_DICT + pickle.BINUNICODE + (7).to_bytes(4, "little") + b"forward" + pickle.NONE
                        + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD + pickle.STOP)
    result = _import_file(patched, tmp_path / "x.safetensors", "--trust-pickle")
    assert result.exit_code == 2 and torch.nn.Conv2d.forward is not None
    assert _one_line_error(result.output).endswith("refused: the pickle changes torch.nn.modules.conv.Conv2d, which a weights "
                                                   "file never needs")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "x.safetensors").exists()


def test_a_pickled_module_is_unpickled_only_when_trusted(xrv_cache, tmp_path, monkeypatch):
    from cxrtool.models.checkpoint import read_card
    from cxrtool.models.sources import xrv as xrv_source

    refused = _import(DENSE, xrv_cache, tmp_path / "a.safetensors", trust=False)
    assert refused.exit_code == 2 and not (tmp_path / "a.safetensors").exists()
    assert "not one of TorchXRayVision's published files" in _one_line_error(refused.output)
    assert "--trust-pickle" in _one_line_error(refused.output) and "unpickled here" not in refused.output
    state_dict = _import(RESNET, xrv_cache, tmp_path / "r.safetensors", trust=False)  # weights_only=True reads it: no flag
    assert state_dict.exit_code == 0, state_dict.output
    digest = __import__("hashlib").sha256((xrv_cache / _file_name(DENSE)).read_bytes()).hexdigest()
    monkeypatch.setitem(xrv_source.PUBLISHED_SHA256, DENSE, digest)  # as if it were XRV's published file
    published = _import(DENSE, xrv_cache, tmp_path / "p.safetensors", trust=False)
    assert published.exit_code == 0, published.output
    assert "unpickled here (its SHA-256 is TorchXRayVision's published file's)" in published.output
    assert read_card(tmp_path / "p.safetensors").source["unpickled"] is True


def test_xrvs_densenet_in_torchs_older_format_imports(xrv_cache, tmp_path):
    """XRV's DenseNet files predate torch's zip format: the same module in the older one."""
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy" / _file_name(DENSE)
    legacy.parent.mkdir()
    torch.save(torch.load(xrv_cache / _file_name(DENSE), weights_only=False), legacy, _use_new_zipfile_serialization=False)
    assert _import(DENSE, legacy.parent, tmp_path / "old.safetensors").exit_code == 0
    assert _import(DENSE, xrv_cache, tmp_path / "new.safetensors").exit_code == 0
    old, new = load_file(tmp_path / "old.safetensors"), load_file(tmp_path / "new.safetensors")
    assert old.keys() == new.keys() and all(torch.equal(old[key], new[key]) for key in old)
