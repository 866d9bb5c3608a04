"""Checkpoints (round trip, no pickling, bad files), the network, losses, configuration."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cxrtool.models.checkpoint import (
    CheckpointError,
    ModelCard,
    load_checkpoint,
    load_tree,
    read_card,
    save_checkpoint,
    save_tree,
)
from cxrtool.models.heads import ModelOutput
from cxrtool.models.network import CXRClassifier, pick_device
from cxrtool.preprocess import Preprocessing, prepare
from cxrtool.registry import ARCHITECTURES
from cxrtool.train.config import load_config, parse_overrides
from cxrtool.train.losses import LossContext, build_loss

FINDINGS = ["Effusion", "Nodule", "Cardiomegaly"]


def _card(**extra) -> ModelCard:
    return ModelCard(
        architecture="resnet18",
        findings=list(FINDINGS),
        preprocessing=Preprocessing(input_size=64).to_dict(),
        thresholds={"Effusion": 0.3, "Nodule": 0.7},
        **extra,
    )


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = CXRClassifier("resnet18", FINDINGS).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, _card(name="rt"))
    loaded, card = load_checkpoint(path)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    assert card.findings == FINDINGS and card.name == "rt"
    assert card.threshold_for("Nodule") == 0.7 and card.threshold_for("Cardiomegaly") == 0.5
    assert card.cxrtool_version and card.created
    # The file is plain safetensors: header JSON then raw tensors, no pickle opcodes.
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert "cxrtool_card" in header["__metadata__"]
    assert b"\x80\x04" not in raw[: 8 + header_len]  # no pickle protocol marker in the header


def test_read_card_is_header_only_and_refuses_foreign_files(tmp_path):
    model = CXRClassifier("resnet18", FINDINGS)
    path = save_checkpoint(tmp_path / "m.safetensors", model, _card())
    assert read_card(path).architecture == "resnet18"
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_card(bogus)
    pickled = tmp_path / "old.pt"
    torch.save(model.state_dict(), pickled)
    with pytest.raises(CheckpointError):
        load_checkpoint(pickled)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_card(tmp_path / "missing.safetensors")


def test_card_mismatching_weights_is_refused(tmp_path):
    model = CXRClassifier("resnet18", FINDINGS)
    card = _card()
    card.architecture = "resnet34"
    path = save_checkpoint(tmp_path / "m.safetensors", model, card)
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path)


def test_training_state_tree_round_trip(tmp_path):
    model = CXRClassifier("resnet18", FINDINGS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    optimizer.step()
    tree = {"optimizer": optimizer.state_dict(), "epoch": 3, "history": [{"a": 1.5}], "rng": torch.get_rng_state(),
            "tuple": (1, "x"), "none": None}
    path = save_tree(tmp_path / "state.safetensors", tree)
    back = load_tree(path)
    assert back["epoch"] == 3 and back["history"] == [{"a": 1.5}] and back["tuple"] == (1, "x") and back["none"] is None
    assert torch.equal(back["rng"], tree["rng"])
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])  # int keys and param groups survive
    assert fresh.state_dict()["param_groups"][0]["lr"] == pytest.approx(1e-3)
    state0 = back["optimizer"]["state"][0]
    assert torch.equal(state0["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(TypeError):
        save_tree(tmp_path / "bad.safetensors", {"obj": object()})


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "efficientnet_b0", "convnext_nano"])
def test_registry_cam_layers_exist(name):
    model = CXRClassifier(name, FINDINGS)
    layer = model.get_submodule(model.cam_layer)
    assert layer is not None
    assert ARCHITECTURES[name].cam_layer in model.cam_layer


def test_unknown_architecture_names_close_matches():
    with pytest.raises(ValueError, match="unknown timm architecture"):
        CXRClassifier("densenet_does_not_exist", FINDINGS)


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_letterbox_geometry_maps_points_back():
    pixels = np.zeros((100, 200), dtype=np.float32)
    pixels[40:60, 150:170] = 1.0  # a bright square at x 150-170, y 40-60
    tensor, geometry = prepare(pixels, Preprocessing(input_size=64, mean=0.0, std=1.0))
    assert tensor.shape == (1, 64, 64)
    # 200 wide -> 64: scale 0.32; 100 high -> 32, padded by 16 on top.
    assert geometry.pad_y == 16 and geometry.pad_x == 0
    ys, xs = np.nonzero(tensor[0] > 0.5)
    x0, y0 = geometry.to_original(xs.min(), ys.min())
    assert abs(x0 - 150) <= 4 and abs(y0 - 40) <= 4
    assert geometry.to_original(*geometry.to_input(123.0, 45.0)) == pytest.approx((123.0, 45.0))


@pytest.mark.parametrize("name", ["bce", "weighted_bce", "focal", "asl"])
def test_losses_ignore_nan_targets_and_learn(name):
    targets = torch.tensor([[1.0, 0.0, math.nan], [0.0, math.nan, 1.0]])
    loss_fn = build_loss(name, LossContext(["a", "b", "c"], targets.numpy()))
    logits = torch.zeros(2, 3, requires_grad=True)
    loss, parts = loss_fn(ModelOutput(logits=logits), {"targets": targets})
    loss.backward()
    assert list(parts) == [name] and float(parts[name]) == pytest.approx(float(loss.detach()))
    assert torch.isfinite(loss)
    assert logits.grad[0, 2] == 0 and logits.grad[1, 1] == 0  # ignored entries get no gradient
    assert logits.grad[0, 0] < 0 and logits.grad[0, 1] > 0  # positives pushed up, negatives down


def test_config_layers_and_errors(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model:\n  architecture: resnet18\nepochs: 4\nloss: focal\n")
    config = load_config(yaml_file, {"epochs": "7", **parse_overrides(["lr=0.01", "augment=false"])})
    assert (config.architecture, config.epochs, config.loss, config.lr, config.augment) == ("resnet18", 7, "focal", 0.01, False)
    with pytest.raises(ValueError, match="unknown setting 'epoch'"):
        load_config(None, {"epoch": 3})
    with pytest.raises(ValueError, match="epochs expects an integer"):
        load_config(None, {"epochs": "many"})
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["epochs"])
    config = load_config(None, {"labels": "x.csv", "loss": "hinge"})
    with pytest.raises(ValueError, match="unknown loss term 'hinge' in 'hinge'; choose from bce, weighted_bce, focal, asl"):
        config.validate()


def test_the_registry_is_the_one_source_of_names():
    """Loss names, CAM methods and their labels, threshold methods, uncertainty policies and
    the default architecture live in cxrtool.registry; the modules that implement them
    agree with it, and the CLI's choices come from it."""
    from typer.testing import CliRunner

    from cxrtool import registry
    from cxrtool.cli import app
    from cxrtool.data import labels
    from cxrtool.evaluate.classification import choose_thresholds
    from cxrtool.explain.cams import CAM_METHODS
    from cxrtool.models.heads import head_classes
    from cxrtool.train.config import TrainConfig
    from cxrtool.train.losses import LossContext, build_loss

    assert [*CAM_METHODS, registry.ATTENTION_METHOD, registry.OCCLUSION_METHOD] == list(registry.CAM_METHOD_LABELS)
    for name in registry.LOSSES:
        build_loss(name, LossContext(["a", "b"], np.array([[1.0, 0.0], [0.0, 1.0]]), width=8))  # width: the radiomics term
    assert set(head_classes()) == set(registry.HEADS)
    for method in registry.THRESHOLD_METHODS:
        choose_thresholds([0, 1, 1], [0.2, 0.6, 0.9], method=method)
    assert labels.UNCERTAIN_POLICIES == tuple(registry.UNCERTAIN_POLICIES)
    assert labels.LABEL_FORMATS == registry.LABEL_FORMATS
    defaults = TrainConfig()
    assert (defaults.architecture, defaults.loss) == (registry.DEFAULT_ARCHITECTURE, registry.DEFAULT_LOSS)
    runner = CliRunner()
    shown = runner.invoke(app, ["train", "--help"]).output.replace("│", " ")  # the help box's borders where it wraps
    assert ", ".join(registry.LOSSES) in " ".join(shown.split())
    refused = runner.invoke(app, ["evaluate", "x.csv", "--uncertain", "maybe"])
    assert refused.exit_code == 2 and "ignore, positive, negative" in " ".join(refused.output.split())


def test_a_backbone_that_cannot_dilate_is_refused_with_the_reason():
    from cxrtool.models.network import CXRClassifier

    with pytest.raises(ValueError, match="densenet121 cannot dilate its last stages"):
        CXRClassifier("densenet121", ["Effusion"], output_stride=16)
