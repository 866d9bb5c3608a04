"""Paper 4's radiomics feedback loop: the region rule and NT-Xent against hand computations,
the cycle's cache and resume, unlabelled images, refused regions, and a network left as it was."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from cxrtool.cli import app
from cxrtool.models.heads import ModelOutput
from cxrtool.train.feedback import (
    FeedbackCache,
    FeedbackRun,
    choose_findings,
    feature_names,
    measure_regions,
    refresh_part,
    region_box,
    regions_in_border_band,
    standardised,
)
from cxrtool.train.losses import LossContext, RadiomicsContrast, build_loss, nt_xent

runner = CliRunner()


def _hand_region(cam: np.ndarray) -> tuple[int, int, int, int]:
    """The rule written out independently: OpenCV's 5 x 5 Gaussian (sigma 0) is the binomial
    kernel [1, 4, 6, 4, 1] / 16 in each direction, the border reflected without repeating
    the edge; components of the thresholded map, their bounding boxes, the highest mean."""
    normalised = (cam - cam.min()) / (cam.max() - cam.min())
    kernel = np.array([1, 4, 6, 4, 1], dtype=np.float64) / 16
    padded = np.pad(normalised.astype(np.float64), 2, mode="reflect")
    rows = sum(kernel[k] * padded[k:k + cam.shape[0], :] for k in range(5))
    blurred = sum(kernel[k] * rows[:, k:k + cam.shape[1]] for k in range(5))
    labels, _ = ndimage.label(blurred > 0.5, structure=np.ones((3, 3)))
    boxes = [(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in ndimage.find_objects(labels)]
    return max(boxes, key=lambda b: normalised[b[0]:b[2], b[1]:b[3]].mean())


def test_the_region_rule_equals_a_hand_computation_and_takes_the_strongest_box_not_the_largest():
    cam = np.zeros((64, 64), dtype=np.float32)
    cam[40:44, 40:48] = 2.0  # small and strong
    cam[5:25, 5:29] = 1.8  # large and weaker (normalised 0.9)
    cam[50:60, 5:15] = 1.1  # normalised 0.55: only its inside survives the blur's threshold
    assert region_box(cam) == _hand_region(cam) == (40, 40, 44, 48)
    # by hand on the edges: an edge pixel of a plateau of 1 blurs to 11/16 (kept), the pixel
    # outside to 5/16 (not), so the box is the plateau itself
    cam[40:44, 40:48] = 0.0
    assert region_box(cam) == _hand_region(cam) == (5, 5, 25, 29)
    cam[5:25, 5:29] = 0.0  # the 0.55 plateau alone: now the map's maximum, normalised to 1
    assert region_box(cam) == (50, 5, 60, 15)
    rng = np.random.default_rng(3)
    for _ in range(20):  # smooth random maps with several blobs
        noisy = ndimage.gaussian_filter(rng.random((48, 48)), 3).astype(np.float32)
        assert region_box(noisy) == _hand_region(noisy)
    assert region_box(np.zeros((32, 32), dtype=np.float32)) is None  # a flat map: no region


def test_nt_xent_equals_its_known_value_on_a_tiny_batch():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # each of the four: its pair at cosine 1, the other two at 0; tau 0.5
    expected = math.log(1 + 2 * math.exp(-1 / 0.5))
    assert nt_xent(a, a.clone(), 0.5).item() == pytest.approx(expected, abs=1e-6)
    # scaled copies change nothing (cosine similarity); swapped pairs make it worse
    assert nt_xent(3 * a, a, 0.5).item() == pytest.approx(expected, abs=1e-6)
    assert nt_xent(a, a.flip(0), 0.5).item() > expected + 1


def test_the_share_of_regions_in_the_border_band_counts_their_centres_in_the_outer_tenth():
    # a 100 px square: the band is x or y < 10 or >= 90
    boxes = np.array([[0, 0, 20, 20],     # centre (10, 10): just inside, 10 is not < 10
                      [0, 0, 18, 18],     # centre (9, 9): in the band
                      [40, 85, 60, 100],  # centre x 92.5: in the band
                      [40, 40, 60, 60]])  # the middle
    assert regions_in_border_band(boxes, 100) == 0.5
    assert regions_in_border_band(boxes[:0], 100) is None and regions_in_border_band(boxes, 0) is None


def test_the_finding_choice_takes_the_best_scored_present_finding_else_the_top_one():
    probabilities = np.array([[0.1, 0.7, 0.3], [0.1, 0.7, 0.3], [0.2, 0.1, 0.6]])
    targets = np.array([[1, 0, 1], [0, 0, 0], [np.nan, np.nan, np.nan]])
    assert choose_findings(probabilities, targets) == [2, 1, 2]


def _term_with_bank(rows: int = 6):
    term = RadiomicsContrast(8, temperature=0.5)
    features = np.random.default_rng(0).normal(size=(rows, len(feature_names()))).astype(np.float32)
    term.set_bank(np.arange(rows), features, rows)
    return term


def test_unlabelled_images_reach_the_contrast_and_never_the_classification_term():
    term = _term_with_bank()
    loss = build_loss("focal", LossContext(["A", "B"]))
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.nan, math.nan], [math.nan, math.nan]])
    batch = {"targets": targets, "index": torch.tensor([0, 1, 4, 5])}
    logits = torch.randn(4, 2, requires_grad=True)
    embedding = torch.randn(4, 8, requires_grad=True)
    output = ModelOutput(logits=logits, embedding=embedding)
    classification, _ = loss(output, batch)
    classification.backward()
    assert logits.grad[:2].abs().sum() > 0 and torch.all(logits.grad[2:] == 0)  # unlabelled rows: no gradient
    term(output, batch).backward()
    assert torch.all(embedding.grad.abs().sum(1) > 0)  # every image with a region, unlabelled too


def test_images_without_a_region_are_left_out_and_a_batch_with_fewer_than_two_gives_zero():
    term = RadiomicsContrast(8)
    assert term(ModelOutput(logits=torch.zeros(3, 1), embedding=torch.randn(3, 8)), {"index": torch.arange(3)}).item() == 0
    features = np.random.default_rng(0).normal(size=(4, len(feature_names()))).astype(np.float32)
    features[1:] = np.nan  # only row 0 has a region
    term.set_bank(np.arange(4), features, 4)
    embedding = torch.randn(3, 8, requires_grad=True)
    value = term(ModelOutput(logits=torch.zeros(3, 1), embedding=embedding), {"index": torch.tensor([0, 1, 2])})
    assert value.item() == 0 and value.requires_grad


def test_a_region_pyradiomics_refuses_is_counted_and_dropped_and_the_rest_are_measured():
    rng = np.random.default_rng(1)
    squares = [rng.integers(0, 256, (48, 48)).astype(np.uint8) for _ in range(3)]
    boxes = [(10, 10, 30, 30), (10, 10, 11, 30), (5, 5, 20, 25)]  # the second is one pixel thin: a line
    features, reasons = measure_regions(squares, boxes, workers=2)  # in the radiomics loop's worker processes
    assert features.shape == (3, len(feature_names())) == (3, 102)
    assert np.isfinite(features[[0, 2]]).all() and np.isnan(features[1]).all()
    assert reasons[0] == reasons[2] == "" and "a line" in reasons[1]
    valid = ~np.isnan(features).any(axis=1)
    z = standardised(features, valid)
    assert np.allclose(z[valid].mean(0), 0, atol=1e-5)


def _tiny_network(findings=("A", "B")):
    from cxrtool.models.network import CXRClassifier

    torch.manual_seed(0)
    return CXRClassifier("resnet18", list(findings), output_stride=16)


def _run(tmp_path, positions=8, method="eigencam") -> FeedbackRun:
    rng = np.random.default_rng(0)
    squares = {i: rng.integers(0, 256, (64, 64)).astype(np.uint8) for i in range(positions)}
    squares[3] = None  # an unreadable image

    targets = np.array([[1, 0], [0, 0], [np.nan, np.nan]] * 3, dtype=np.float64)[:positions]
    return FeedbackRun(positions=np.arange(positions), targets=targets, square=lambda row: squares[row],
                       to_input=lambda square: torch.from_numpy(square[None].astype(np.float32) / 255),
                       cache=FeedbackCache(tmp_path / "feedback"), method=method, layer=None, fraction=1.0, seed=0,
                       device=torch.device("cpu"), batch_size=4, workers=1)


def test_the_network_after_a_cycle_has_no_hooks_and_the_parameters_mode_and_gradients_it_had(tmp_path):
    network = _tiny_network().train()
    network(torch.randn(2, 1, 64, 64)).sum().backward()  # gradients in flight, as in training
    before = {k: v.clone() for k, v in network.state_dict().items()}
    grads = {k: p.grad.clone() for k, p in network.named_parameters()}
    cycle = _run(tmp_path, method="gradcam").cycle(network, 1, None)
    assert cycle.refreshed == 8 and cycle.dropped.get("unreadable image") == 1
    assert network.training and all(p.requires_grad for p in network.parameters())
    for module in network.modules():
        assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                    or module._backward_pre_hooks), module
    for key, value in network.state_dict().items():
        assert torch.equal(value, before[key]), key
    for key, parameter in network.named_parameters():
        assert torch.equal(parameter.grad, grads[key]), key


def test_a_finished_cycle_is_read_back_and_other_weights_compute_their_own(tmp_path):
    network = _tiny_network()
    run = _run(tmp_path)
    first = run.cycle(network, 1, None)
    assert not first.reused and first.valid.sum() >= 5  # eigencam always draws a map: all readable images
    again = run.cycle(network, 1, None)
    assert again.reused and np.array_equal(again.features, first.features, equal_nan=True)
    assert again.side == first.side == 64 and again.in_border_band == first.in_border_band is not None
    assert first.record()["regions_in_border_band"] == round(first.in_border_band, 3)
    with torch.no_grad():
        network.head.weight.add_(0.01)  # other weights: another digest, a cycle of their own
    other = run.cycle(network, 1, None)
    assert not other.reused and other.key != first.key
    assert len(list((tmp_path / "feedback").glob("cycle001-*.npz"))) == 2
    # the next cycle, measuring half the pool, keeps the other half's features from the last
    run.fraction = 0.5
    second = run.cycle(network, 2, other)
    assert second.refreshed == 4
    untouched = np.setdiff1d(np.arange(8), refresh_part(8, 2, 0.5, 0))
    assert len(untouched) == 4 and np.array_equal(second.features[untouched], other.features[untouched], equal_nan=True)
    assert np.array_equal(refresh_part(8, 3, 0.5, 0), refresh_part(8, 1, 0.5, 0))  # the parts in turn


def _phantoms(folder, n: int = 40):
    from cxrtool.data.phantom import generate_cohort

    generate_cohort(folder, n_images=n, size=96, seed=7, write_masks=False, workers=1)
    return folder / "Data_Entry.csv"


@pytest.mark.slow
def test_the_preset_trains_with_unlabelled_images_and_resumes_bit_identically_reusing_the_cycle(tmp_path):
    from cxrtool.models.checkpoint import load_checkpoint, load_tree, read_card
    from cxrtool.train import load_config, train

    labels = _phantoms(tmp_path / "cohort")
    unlabelled = _phantoms(tmp_path / "more", n=12).parent / "images"
    settings = {"labels": str(labels), "architecture": "resnet18", "input_size": 64, "batch_size": 8, "workers": 0,
                "device": "cpu", "seed": 1, "preset": "radiomics-feedback", "epochs": 3, "augment": False,
                "findings": ["Cardiomegaly", "Effusion", "Mass"], "unlabelled": str(unlabelled),
                "feedback_cam": "eigencam", "output_stride": 16}
    messages = []
    whole = train(load_config(None, {**settings, "out": str(tmp_path / "whole")}),
                  progress=lambda event: messages.append(event.message))
    assert whole.n_unlabelled == 12
    cycles = [m for m in messages if m.startswith("feedback cycle") and "regions" in m]
    assert len(cycles) == 2 and "read back" not in cycles[0]
    card = read_card(whole.checkpoint)
    record = card.training["feedback"]
    assert record["unlabelled_images"] == 12 and record["extractor"]["features"] == 102
    assert [c["cycle"] for c in record["cycles"]][: card.training["best_epoch"] - 1] == list(range(1, card.training["best_epoch"]))
    assert "highest mean activation" in record["region_rule"]
    shown = runner.invoke(app, ["models", str(whole.checkpoint)], terminal_width=300)
    assert "radiomics feedback" in shown.output and "12 unlabelled images" in shown.output
    history = load_tree(tmp_path / "whole" / "last_state.safetensors")["history"]
    assert history[-1]["train_loss_terms"]["radiomics"] > 0  # the contrast ran after the first cycle
    # inference sees the ordinary network: the radiomics branch is not in it
    network, _ = load_checkpoint(whole.checkpoint)
    assert not any("radiomics" in name or "encoder" in name for name in network.state_dict())

    # interrupted in epoch 3, after cycle 2 was finished; resumed: cycle 2 read back, same weights
    def interrupt(event):
        if event.kind == "batch" and event.epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, {**settings, "out": str(tmp_path / "half")}), progress=interrupt)
    messages.clear()
    train(load_config(None, {**settings, "out": str(tmp_path / "half")}), resume=True,
          progress=lambda event: messages.append(event.message))
    assert any(m.startswith("feedback cycle 2: read back from its cache") for m in messages)
    a = load_tree(tmp_path / "whole" / "last_state.safetensors")
    b = load_tree(tmp_path / "half" / "last_state.safetensors")
    for part in ("model", "loss"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), key


def test_unlabelled_images_without_the_radiomics_term_are_refused_with_the_reason(tmp_path):
    labels = _phantoms(tmp_path / "cohort", n=8)
    result = runner.invoke(app, ["train", str(labels), "--unlabelled", str(labels.parent / "images"), "--out",
                                 str(tmp_path / "run"), "--epochs", "1"])
    assert result.exit_code != 0 and "radiomics contrast only" in result.output


def test_unlabelled_images_are_read_from_a_folder_or_a_csv_with_missing_files_counted(tmp_path):
    from PIL import Image

    from cxrtool.data.labels import read_unlabelled

    folder = tmp_path / "films"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / name)
    paths, missing = read_unlabelled(folder)
    assert sorted(Path(p).name for p in paths) == ["a.png", "b.png"] and missing == 0
    table = tmp_path / "unlabelled.csv"
    table.write_text("Image Index,Patient ID\nfilms/a.png,1\nfilms/gone.png,2\n")
    paths, missing = read_unlabelled(table)
    assert paths == [str(tmp_path / "films" / "a.png")] and missing == 1
    (tmp_path / "bad.csv").write_text("name\nx\n")
    with pytest.raises(ValueError, match="no image column"):
        read_unlabelled(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError):
        read_unlabelled(tmp_path / "nowhere")
