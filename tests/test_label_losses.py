"""The loss terms of papers 1 and 2 on hand-made batches with known answers, and the
presets that put each paper's recipe together: trained, saved, resumed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cxrtool.cli import app
from cxrtool.models.heads import ModelOutput
from cxrtool.train.losses import CorrelationConsistency, CorrelationSupCon, LossContext, PrototypeContrast, build_loss

runner = CliRunner()


def _batch(targets) -> dict[str, torch.Tensor]:
    return {"targets": torch.tensor(targets, dtype=torch.float32)}


def test_apcl_identical_features_sit_on_their_prototype_and_the_contrast_has_its_exact_value():
    apcl = PrototypeContrast(["A", "B"], 2, np.array([5, 5]), momentum=0.5, temperature=0.5, similarity=0.0)
    e_a, e_b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    features = torch.stack([torch.stack([e_a, e_b]), torch.stack([e_a, e_b])]).requires_grad_(True)  # (2 images, 2 findings, 2)
    loss = apcl(ModelOutput(logits=torch.zeros(2, 2), features=features), _batch([[1, 1], [1, 1]]))
    assert torch.allclose(apcl.prototypes[0], torch.eye(2))  # identical features: zero distance to their prototype
    assert not apcl.seen[1].any()  # no finding known absent yet: no absent prototype to push from
    # each positive feature: similarity 1 to its own prototype, 0 to the other's
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1 / 0.5)), abs=1e-6)
    loss.backward()
    assert torch.isfinite(features.grad).all()
    # the moving average: a second batch moves a prototype halfway (momentum 0.5), unit length
    turned = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    apcl(ModelOutput(logits=torch.zeros(1, 2), features=turned), _batch([[1, 0]]))
    assert torch.allclose(apcl.prototypes[0, 0], F.normalize(torch.tensor([0.5, 0.5]), dim=0), atol=1e-6)
    assert torch.allclose(apcl.prototypes[0, 1], e_b)  # not positive in that batch: unchanged
    assert torch.allclose(apcl.prototypes[1, 1], e_b) and apcl.seen[1].tolist() == [False, True]  # B absent: its first absent mean


def _collapse_batch():
    """Labels, and three kinds of per-finding features for them: image-independent
    (each finding's slot a constant), random, and informative (one code where the finding
    is present, another where it is absent, plus noise)."""
    generator = torch.Generator().manual_seed(0)
    batch, count, dim = 64, 8, 32
    targets = (torch.rand(batch, count, generator=generator) < 0.3).float()
    present, absent = torch.randn(count, dim, generator=generator), torch.randn(count, dim, generator=generator)
    collapsed = present[None].expand(batch, count, dim).clone()
    random = torch.randn(batch, count, dim, generator=generator)
    noise = 0.3 * torch.randn(batch, count, dim, generator=generator)
    informative = torch.where(targets[..., None] > 0, present[None], absent[None]) + noise
    return targets, {"collapsed": collapsed, "random": random, "informative": informative}


@pytest.mark.parametrize("term", ["apcl", "lcsupcon"])
def test_features_that_carry_nothing_about_the_image_no_longer_minimise_the_contrastive_terms(term):
    """The first versions contrasted a finding's feature only with other findings': a slot
    constant over images (each finding's slot is told apart by its own query anyway) scored
    0.0003 (apcl) and 1.33 (lcsupcon) against 0.14 and 3.46 for random features. With the
    same finding's absent side as negatives, informative features score best."""
    targets, kinds = _collapse_batch()
    count = targets.shape[1]
    scores = {}
    for kind, features in kinds.items():
        loss = build_loss(term, LossContext([str(k) for k in range(count)], targets.numpy(), {"head_dim": 32}))
        scores[kind] = float(loss(ModelOutput(logits=torch.zeros(len(targets), count), features=features), {"targets": targets})[0])
    assert scores["informative"] < scores["collapsed"] - 0.5, scores
    if term == "apcl":  # a constant slot sits on both of its finding's prototypes: log 2 per label
        assert scores["collapsed"] == pytest.approx(math.log(2), abs=0.01)


def test_label_features_start_decoupled_in_every_per_finding_head():
    """At 0.02 the decoder's queries were swamped by the image tokens (the findings'
    features had mean cosine 0.96 at initialisation); the label-feature head's features
    were the same mean token for every finding (cosine 1.00)."""
    from cxrtool.models.network import CXRClassifier

    torch.manual_seed(0)
    for head in ("decoder", "lga", "label_features"):
        settings = {"dim": 64, **({"text_dim": 0} if head == "lga" else {})}
        model = CXRClassifier("resnet18", [f"f{k}" for k in range(8)], head=head, head_settings=settings).eval()
        with torch.no_grad():
            features = F.normalize(model(torch.randn(4, 1, 64, 64), full=True).features, dim=-1)
        cosine = features @ features.transpose(1, 2)
        off_diagonal = (cosine.sum((1, 2)) - 8) / (8 * 7)
        assert float(off_diagonal.abs().mean()) < 0.2, head


def test_label_features_checkpoints_from_before_the_offsets_load_with_their_outputs_unchanged():
    from cxrtool.models.heads import LabelFeatureHead

    torch.manual_seed(0)
    head = LabelFeatureHead(16, ["A", "B"], dim=8).eval()
    old = {k: v for k, v in head.state_dict().items() if k != "identity"}
    renewed = LabelFeatureHead(16, ["A", "B"], dim=8).eval()
    renewed.load_state_dict(old)
    assert torch.equal(renewed.identity, torch.zeros(2, 8))
    feature_map = torch.randn(2, 16, 3, 3)
    with torch.no_grad():
        head.identity.zero_()
        assert torch.allclose(renewed(feature_map, None).logits, head(feature_map, None).logits)


def _apcl_rank(rank: int, store: str, batches: list, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        apcl = PrototypeContrast(["A", "B", "C"], 4, np.array([3, 3, 3]), momentum=0.5)
        half = slice(rank * 2, rank * 2 + 2)
        for features, targets in batches:
            apcl(ModelOutput(logits=torch.zeros(2, 3), features=features[half]), _batch(targets[half]))
        torch.save(apcl.prototypes, out.format(rank))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_apcl_prototypes_stay_equal_across_ranks_and_match_one_process(tmp_path):
    """Under torchrun each rank sees part of the batch: the prototypes' sums are all-reduced,
    so every rank holds the prototypes one process would have made from the whole batch."""
    import torch.multiprocessing as mp

    generator = torch.Generator().manual_seed(0)
    batches = [  # rank 0 holds images 0-1, rank 1 images 2-3
        (torch.randn(4, 3, 4, generator=generator), [[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 1]]),  # C on rank 1 only
        (torch.randn(4, 3, 4, generator=generator), [[0, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0]]),  # every one moves
        (torch.randn(4, 3, 4, generator=generator), [[1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]]),  # none on rank 1
    ]
    out = str(tmp_path / "prototypes-{}.pt")
    mp.start_processes(_apcl_rank, args=(str(tmp_path / "store"), batches, out), nprocs=2, start_method="spawn")
    one = PrototypeContrast(["A", "B", "C"], 4, np.array([3, 3, 3]), momentum=0.5)
    history = []
    for features, targets in batches:
        one(ModelOutput(logits=torch.zeros(4, 3), features=features), _batch(targets))
        history.append(one.prototypes.clone())
    assert not torch.allclose(history[1], history[0]) and not torch.allclose(history[2], history[1])  # they do move
    ranks = [torch.load(out.format(rank)) for rank in range(2)]
    assert torch.equal(ranks[0], ranks[1])
    assert torch.allclose(ranks[0], one.prototypes, atol=1e-6)


def test_apcl_weighs_rare_findings_up():
    common_rare = PrototypeContrast(["A", "B"], 4, np.array([100, 4]), rarity=0.5)
    assert common_rare.rarity_weights[1] / common_rare.rarity_weights[0] == pytest.approx(5.0)
    never = PrototypeContrast(["A", "B"], 4, np.array([10, 0]))
    assert torch.isfinite(never.rarity_weights).all() and float(never.rarity_weights[1]) == 0.0


@pytest.mark.parametrize("term", ["apcl", "lcsupcon", "lcc"])
def test_a_batch_without_positives_gives_a_finite_zero_or_defined_term(term):
    context = LossContext(["A", "B", "C"], np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32), {"head_dim": 8})
    loss = build_loss(term, context)
    features = torch.randn(3, 3, 8, requires_grad=True)
    correlation = torch.full((3, 3), 1 / 3)
    total, _ = loss(ModelOutput(logits=torch.zeros(3, 3), features=features, correlation=correlation),
                    _batch([[0, 0, 0], [0, float("nan"), 0], [0, 0, 0]]))
    assert torch.isfinite(total)
    if term != "lcc":  # lcc compares correlations, positives or not
        assert total.item() == 0.0
    total.backward()
    assert torch.isfinite(features.grad).all()


def test_a_label_set_of_one_finding_trains_on_its_classification_term_and_says_so():
    """One finding: each head still gives what it promises; lcc, which only sets findings
    against each other, is zero and the user is told it adds nothing; apcl and lcsupcon
    still contrast the finding's present and absent features."""
    from cxrtool import registry
    from cxrtool.models.network import CXRClassifier

    said: list[str] = []
    targets = np.array([[1], [0], [1]], dtype=np.float32)
    loss = build_loss("asl+0.2*apcl+0.1*lcc+0.2*lcsupcon", LossContext(["Effusion"], targets, {"head_dim": 32}, said.append))
    assert said == ["warning: one finding (Effusion): lcc set findings against each other and have no "
                    "other finding here; the classification term does the training"]
    assert build_loss("asl+apcl", LossContext(["Effusion"], targets, {"head_dim": 32}, said.append)) and len(said) == 1
    build_loss("lcc", LossContext(["Effusion"], targets, {"head_dim": 32}, said.append))
    assert said[-1].endswith("lcc set findings against each other and have no other finding here; "
                             "with no classification term in the loss the model learns next to nothing")
    for head in registry.HEADS:
        torch.manual_seed(0)
        model = CXRClassifier("resnet18", ["Effusion"], head=head, head_settings={"dim": 32} if head not in ("linear", "lse") else None)
        output = model(torch.randn(3, 1, 64, 64), full=True)
        assert output.logits.shape == (3, 1) and torch.isfinite(output.logits).all(), head
        if {"features", "correlation"} <= model.head.gives:
            total, parts = loss(output, _batch(targets))
            parts = {name: float(value) for name, value in parts.items()}
            assert parts["lcc"] == pytest.approx(0.0, abs=1e-6)
            assert parts["apcl"] > 0 and math.isfinite(parts["lcsupcon"])
            total.backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), head


def test_lcsupcon_disjoint_label_sets_give_no_positive_pair():
    supcon = CorrelationSupCon(["A", "B"], None)
    features = torch.randn(2, 2, 4, requires_grad=True)
    assert supcon(ModelOutput(logits=torch.zeros(2, 2), features=features), _batch([[1, 0], [0, 1]])).item() == 0.0


def test_lcsupcon_pulls_the_same_finding_together_and_weighs_related_negatives_down():
    targets = np.array([[1, 1], [1, 1], [1, 0], [0, 0]], dtype=np.float32)  # A and B co-occur: P(B|A) = 2/3, P(A|B) = 1
    supcon = CorrelationSupCon(["A", "B"], targets, temperature=1.0)
    assert float(supcon.relatedness[0, 1]) == pytest.approx((2 / 3 + 1) / 2)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    together = torch.stack([torch.stack([e1, e2]), torch.stack([e1, e2])])  # finding A always e1, B always e2
    mixed = torch.stack([torch.stack([e1, e2]), torch.stack([e2, e1])])
    batch = _batch([[1, 1], [1, 1]])
    assert float(supcon(ModelOutput(logits=torch.zeros(2, 2), features=together), batch)) < \
        float(supcon(ModelOutput(logits=torch.zeros(2, 2), features=mixed), batch))
    # the known value for "together": each anchor has 1 positive (sim 1) and 2 negatives (sim 0), weighted 1 - C
    w = 1 - float(supcon.relatedness[0, 1])
    expected = -math.log(math.e / (math.e + 2 * w))
    assert float(supcon(ModelOutput(logits=torch.zeros(2, 2), features=together), batch)) == pytest.approx(expected, abs=1e-5)


def test_lcc_is_zero_when_the_features_correlate_as_the_labels_do_and_the_head_agrees():
    lcc = CorrelationConsistency()
    e = torch.eye(4)[:3]  # three orthogonal directions
    # image 1 has A and B (aligned features), lacks C (orthogonal); image 2 has C only
    features = torch.stack([torch.stack([e[0], e[0], e[2]]), torch.stack([e[0], e[1], e[2]])])
    batch = _batch([[1, 1, 0], [0, 0, 1]])
    local = torch.tensor([[[1.0, 1, 0], [1, 1, 0], [0, 0, 1]], [[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]]).mean(0)
    agreeing = local / local.sum(-1, keepdim=True)
    assert float(lcc(ModelOutput(logits=torch.zeros(2, 3), features=features, correlation=agreeing), batch)) \
        == pytest.approx(0.0, abs=1e-6)
    assert float(lcc(ModelOutput(logits=torch.zeros(2, 3), features=features, correlation=torch.full((3, 3), 1 / 3)), batch)) > 0.05


def test_lcc_bites_where_an_images_features_disagree_with_its_labels():
    """The first lcc compared two matrices both close to 1/K per row: about 1e-5 at
    initialisation, with a gradient to match. Now a batch whose label features correlate
    against its labels gives a value and a gradient of order one."""
    torch.manual_seed(0)
    targets = _batch([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]])
    features = torch.randn(3, 4, 16)
    features[:, 3] = features[:, 0]  # an absent finding aligned with a present one (present pairs: random)
    features.requires_grad_(True)
    correlation = torch.full((4, 4), 0.25)
    value = CorrelationConsistency()(ModelOutput(logits=torch.zeros(3, 4), features=features, correlation=correlation), targets)
    value.backward()
    assert value.item() > 0.1 and features.grad.norm().item() > 0.05


def _phantoms(folder, n: int = 48):
    from cxrtool.data.phantom import generate_cohort

    generate_cohort(folder, n_images=n, size=96, seed=5, write_masks=False, workers=1)
    return folder / "Data_Entry.csv"


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["prototypes", "label-correlation"])
def test_each_preset_trains_on_phantoms_lowering_its_loss_and_resumes_exactly(preset, tmp_path):
    from cxrtool.models.checkpoint import load_tree, read_card, read_training_tensors
    from cxrtool.registry import PRESETS

    labels = _phantoms(tmp_path / "cohort")
    common = [str(labels), "--arch", "resnet18", "--input-size", "64", "-b", "16", "-j", "0", "--device", "cpu",
              "--seed", "1", "--preset", preset, "--set", "head_dim=32", "--set", "decoder_layers=1", "--set", "augment=false",
              "--set", "lr=0.003"]
    whole = runner.invoke(app, ["train", *common, "--epochs", "4", "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    card = read_card(tmp_path / "whole" / "model.safetensors")
    assert (card.head, card.training["loss"], card.training["preset"]) == (PRESETS[preset]["head"], PRESETS[preset]["loss"], preset)
    history = load_tree(tmp_path / "whole" / "last_state.safetensors")["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    terms = history[-1]["train_loss_terms"]
    assert set(terms) == {name.split("*")[-1] for name in PRESETS[preset]["loss"].split("+")}
    assert all(math.isfinite(value) for value in terms.values())
    # interrupted after epoch 2 (as Ctrl-C would), then resumed: the same weights and running state
    from cxrtool.train import load_config, train
    from cxrtool.train.config import parse_overrides

    def interrupt(event):
        if event.kind == "epoch" and event.epoch == 2:
            raise KeyboardInterrupt

    overrides = {"labels": str(labels), "architecture": "resnet18", "input_size": 64, "batch_size": 16, "workers": 0,
                 "device": "cpu", "seed": 1, "preset": preset, "epochs": 4, "out": str(tmp_path / "half"),
                 **parse_overrides(["head_dim=32", "decoder_layers=1", "augment=false", "lr=0.003"])}
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, overrides), progress=interrupt)
    assert len(load_tree(tmp_path / "half" / "last_state.safetensors")["history"]) == 2
    resumed = runner.invoke(app, ["train", *common, "--epochs", "4", "--out", str(tmp_path / "half"), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a = load_tree(tmp_path / "whole" / "last_state.safetensors")
    b = load_tree(tmp_path / "half" / "last_state.safetensors")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["loss"].keys() == b["loss"].keys()
    for key, value in a["loss"].items():
        assert torch.equal(value, b["loss"][key]), key
    if preset == "prototypes":
        saved = read_training_tensors(tmp_path / "whole" / "model.safetensors")
        assert saved["loss.terms.1.prototypes"].shape == (2, len(card.findings), 32)  # present and absent
        assert bool(saved["loss.terms.1.seen"].any())


# ------------------------------------------------------------------ the long tail: logit adjustment and class-aware sampling


def test_logit_adjustment_shifts_what_the_loss_sees_by_the_prior_log_odds():
    from cxrtool.train.losses import LossContext, build_loss, logit_adjustment

    targets = np.array([[1, 0], [0, 0], [0, 0], [1, np.nan], [1, 1]], dtype=np.float32)  # prevalences 3/5, 1/4
    offset = logit_adjustment(targets, 1.0)
    np.testing.assert_allclose(offset.numpy(), [np.log(0.6 / 0.4), np.log(0.25 / 0.75)], rtol=1e-6)
    logits, batch = torch.randn(4, 2), {"targets": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])}
    adjusted = build_loss("asl+bce", LossContext(["A", "B"], targets, {"logit_adjustment": 0.5}))
    plain = build_loss("asl+bce", LossContext(["A", "B"], targets, {}))
    shifted = ModelOutput(logits=logits + 0.5 * offset)
    assert adjusted(ModelOutput(logits=logits), batch)[0] == pytest.approx(float(plain(shifted, batch)[0]), rel=1e-6)
    assert not any("offset" in key for key in adjusted.state_dict())  # not saved: rebuilt from the labels


def test_class_aware_sampling_draws_each_finding_about_equally_and_splits_across_ranks():
    from cxrtool.train._distributed import DistInfo
    from cxrtool.train.loop import _epoch_order

    rng = np.random.default_rng(0)
    n = 2000
    targets = np.zeros((n, 3), dtype=np.float32)
    targets[:, 0] = rng.random(n) < 0.6  # common
    targets[:, 1] = rng.random(n) < 0.05  # rare
    targets[:7, 2] = 1  # very rare: 7 images
    single = DistInfo()
    order = _epoch_order(n, 3, 0, single, targets=targets)
    assert len(order) == n
    drawn = targets[order]
    # Each finding is the drawn one a third of the time (plus co-occurrence): the 7 images of
    # the rarest are drawn hundreds of times, where a shuffle shows them once.
    assert drawn[:, 2].sum() > n / 3 * 0.85 and drawn[:, 1].sum() > n / 3 * 0.85
    assert _epoch_order(n, 3, 0, single, targets=targets) == order  # a resumed run draws the same
    assert _epoch_order(n, 3, 1, single, targets=targets) != order
    shares = [_epoch_order(n, 3, 0, DistInfo(rank=r, local_rank=r, world_size=2), targets=targets) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(order)
    with pytest.raises(ValueError, match="class-aware sampling needs positive labels"):
        _epoch_order(4, 0, 0, single, targets=np.zeros((4, 2)))
