"""Training end to end: real NIH images, resume after a kill, torchrun with two processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_generic_dataset, tiny_settings
from typer.testing import CliRunner

from cxrtool.cli import app
from cxrtool.models.checkpoint import load_checkpoint, load_tree, read_card
from cxrtool.train.config import load_config
from cxrtool.train.loop import CHECKPOINT_NAME, STATE_NAME, train

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_predict_evaluate_on_real_nih_images(nih_dir, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, [
        "train", str(nih_dir / "Data_Entry_2017_v2020.csv.gz"), "--images", str(nih_dir / "images"),
        "--out", str(run), "--arch", "resnet18", "--input-size", "64", "--epochs", "1", "-b", "32", "-j", "2",
        "--loss", "weighted_bce",
    ])
    assert result.exit_code == 0, result.output
    assert "111732 rows skipped" in result.output
    card = read_card(run / CHECKPOINT_NAME)
    assert card.findings[0] == "Atelectasis" and len(card.findings) == 14
    assert card.training["n_train"] + card.training["n_val"] == 388
    assert set(card.thresholds) == set(card.findings)
    assert (run / "config.yaml").is_file()

    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", str(nih_dir / "images"), "-m", str(run / CHECKPOINT_NAME), "--out", str(out),
                                 "-j", "2", "-b", "32"])
    assert result.exit_code == 0, result.output
    predictions = out / "cxrtool_predictions.csv"
    with open(predictions) as handle:
        assert sum(1 for _ in handle) == 389

    result = runner.invoke(app, ["evaluate", str(predictions), "--labels", str(nih_dir / "Data_Entry_2017_v2020.csv.gz"),
                                 "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "evaluation.json").read_text())
    assert report["matching"]["matched"] == 388
    assert report["thresholds"] == pytest.approx(card.thresholds, abs=1e-6)  # found beside the CSV
    for name in ("evaluation.csv", "roc_curves.png", "pr_curves.png"):
        assert (out / name).stat().st_size > 0
    assert "Atelectasis" in result.output


@pytest.mark.slow
def test_learns_a_visible_finding_and_stores_thresholds(tmp_path):
    labels = make_generic_dataset(tmp_path / "data", n=96)
    config = load_config(None, {"labels": str(labels), "out": str(tmp_path / "run"), "architecture": "resnet18",
                                "input_size": 32, "batch_size": 16, "epochs": 6, "workers": 0, "lr": 3e-3,
                                "loss": "bce", "val_fraction": 0.3, "device": "cpu"})
    result = train(config)
    assert result.best_auroc > 0.85, result.history
    model, card = load_checkpoint(result.checkpoint)
    assert card.findings == ["Disk", "Bar"]
    assert all(0.0 < t < 1.0 for t in card.thresholds.values())
    assert card.metrics["val_mean_auroc"] == pytest.approx(result.best_auroc, abs=1e-6)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    labels = make_generic_dataset(tmp_path / "data", n=48)
    args = tiny_settings(labels, tmp_path / "straight", epochs=3)
    assert runner.invoke(app, ["train", *args]).exit_code == 0

    interrupted = tmp_path / "interrupted"
    # The run kills itself with SIGKILL (no chance to clean up: the worst case) in the middle
    # of its second epoch, after its first step there: no race with the run's speed. The
    # settings are tiny_settings' (the CLI's --resume below must find the same run).
    script = (
        "import os, signal, sys\n"
        "from cxrtool.train import load_config, train\n"
        "config = load_config(None, {'labels': sys.argv[1], 'out': sys.argv[2], 'architecture': 'resnet18', "
        "'input_size': 32, 'batch_size': 8, 'workers': 0, 'device': 'cpu', 'seed': 3, 'epochs': 3})\n"
        "def on(event):\n"
        "    if event.kind == 'batch' and event.epoch == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "train(config, progress=on)\n"
    )
    env = {**os.environ, "CXRTOOL_NO_PROGRESS": "1"}
    killed = subprocess.run([sys.executable, "-c", script, str(labels.absolute()), str(interrupted.absolute())], env=env,
                            capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    state = interrupted / STATE_NAME
    assert state.exists(), killed.stdout + killed.stderr
    epochs_done = int(load_tree(state)["epoch"]) + 1
    assert epochs_done == 1

    result = runner.invoke(app, ["train", *tiny_settings(labels, interrupted, epochs=3), "--resume"])
    assert result.exit_code == 0, result.output
    assert f"resuming after epoch {epochs_done}" in result.output
    final = load_tree(interrupted / STATE_NAME)
    assert int(final["epoch"]) == 2 and len(final["history"]) == 3
    straight = load_tree(tmp_path / "straight" / STATE_NAME)
    for key, value in straight["model"].items():
        torch.testing.assert_close(final["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)

    # Resuming with a different architecture is refused with the reason.
    changed = tiny_settings(labels, interrupted, epochs=3)
    changed[changed.index("resnet18")] = "resnet34"
    result = runner.invoke(app, ["train", *changed, "--resume"])
    assert result.exit_code == 2 and "architecture" in result.output


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("preset", [None, "prototypes", "radiomics-feedback"])
def test_torchrun_two_gloo_processes(preset, tmp_path):
    """Two ranks; with paper 1's recipe too (a transformer head whose forward returns features,
    prototypes saved beside the weights; that the ranks' prototypes agree is
    test_label_losses' two-rank test); and paper 4's, whose feedback cycle the main rank
    computes and the other reads from the cache by the main rank's key."""
    from cxrtool.models.checkpoint import read_training_tensors
    from cxrtool.models.text import encoder_installed

    labels = make_generic_dataset(tmp_path / "data", n=40)
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cxrtool", "train", *tiny_settings(labels, run, epochs=2), *(["--preset", preset] if preset else []),
           *(["--set", "output_stride=8", "--set", "feedback_cam=eigencam"] if preset == "radiomics-feedback" else [])]
    env = {**os.environ, "CXRTOOL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    card = read_card(run / CHECKPOINT_NAME)
    assert card.training["n_train"] + card.training["n_val"] == 40
    state = load_tree(run / STATE_NAME)
    assert int(state["epoch"]) == 1 and len(state["history"]) == 2
    # Only rank 0 talks: one summary line, not two.
    assert (completed.stdout + completed.stderr).count("best validation mean AUROC") == 1
    if preset == "prototypes":
        told = "no description for Disk, Bar" if encoder_installed() else "learns its label embeddings"
        assert card.head == "lga" and (completed.stdout + completed.stderr).count(told) == 1
        saved = read_training_tensors(run / CHECKPOINT_NAME)
        assert saved["loss.terms.1.seen"].all() and torch.isfinite(saved["loss.terms.1.prototypes"]).all()
        assert torch.allclose(saved["loss.terms.1.prototypes"].norm(dim=-1), torch.ones(2, 2))
    if preset == "radiomics-feedback":
        output = completed.stdout + completed.stderr
        assert output.count("feedback cycle 1: 17 maps") == 1, output  # half of the 34 training images, told once
        assert state["feedback"]["number"] == 1 and state["history"][1]["train_loss_terms"]["radiomics"] > 0


def test_bad_training_settings_exit_2(tmp_path):
    labels = make_generic_dataset(tmp_path / "data", n=8)
    result = runner.invoke(app, ["train", str(labels), "--loss", "hinge", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unknown loss term 'hinge' in 'hinge'; choose from" in result.output
    result = runner.invoke(app, ["train", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    result = runner.invoke(app, ["train", str(labels), "--set", "epoch=3"])
    assert result.exit_code == 2 and "unknown setting 'epoch'" in result.output


def test_a_run_config_repeats_from_any_working_folder(tmp_path, monkeypatch):
    """Paths in a YAML config are relative to the file: runs/x/config.yaml repeats (and
    resumes) the run from anywhere."""
    make_generic_dataset(tmp_path / "data", n=24)
    monkeypatch.chdir(tmp_path)
    args = ["train", "data/labels.csv", "--out", "runs/x", "--arch", "resnet18", "--input-size", "32", "-b", "8",
            "-j", "0", "--device", "cpu", "--epochs", "1"]
    assert runner.invoke(app, args).exit_code == 0
    written = (tmp_path / "runs" / "x" / "config.yaml").read_text()
    assert "labels: ../../data/labels.csv" in written and "out: ." in written
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    config = load_config("../../runs/x/config.yaml")
    assert Path(config.labels).resolve() == (tmp_path / "data" / "labels.csv").resolve()
    assert Path(config.out).resolve() == (tmp_path / "runs" / "x").resolve()
    resumed = runner.invoke(app, ["train", "--config", "../../runs/x/config.yaml", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after epoch 1 of 1" in resumed.output


def test_fine_tuning_starts_from_a_checkpoint(tmp_path):
    """--init: the parent's backbone and input; findings it has keep their head rows, new ones
    get new rows; the card names the parent by its SHA-256."""
    from cxrtool.models.checkpoint import file_sha256
    from cxrtool.models.network import CXRClassifier
    from cxrtool.train.loop import Parent

    labels = make_generic_dataset(tmp_path / "data", n=24)
    parent_run = tmp_path / "parent"
    assert runner.invoke(app, ["train", *tiny_settings(labels, parent_run), "--epochs", "1"]).exit_code == 0
    parent_file = parent_run / CHECKPOINT_NAME
    parent_card = read_card(parent_file)
    # the initialisation itself, row by row
    from safetensors.torch import load_file

    state = load_file(str(parent_file))
    child = CXRClassifier("resnet18", ["Bar", "Ring"])
    Parent(parent_file, file_sha256(parent_file), parent_card, state).initialise(child)
    bar = parent_card.findings.index("Bar")
    assert torch.equal(child.head.weight[0], state["head.weight"][bar])
    assert not torch.equal(child.head.weight[1], state["head.weight"][1 - bar])
    assert torch.equal(child.backbone.conv1.weight, state["backbone.conv1.weight"])
    # through the command: another architecture and input are asked for, the parent's are kept
    run = tmp_path / "child"
    result = runner.invoke(app, ["train", *tiny_settings(labels, run), "--init", str(parent_file), "--arch", "densenet121",
                                 "--input-size", "48", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "fine-tuning" in result.output and "architecture densenet121 -> resnet18" in result.output
    card = read_card(run / CHECKPOINT_NAME)
    assert card.architecture == "resnet18" and card.preprocessing == parent_card.preprocessing
    assert card.training["init"]["sha256"] == file_sha256(parent_file) and card.training["init"]["findings_kept"] == ["Disk", "Bar"]


def test_long_tail_options_train_and_are_recorded(tmp_path):
    from cxrtool.models.checkpoint import read_card

    labels = make_generic_dataset(tmp_path / "data", n=24)
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", *tiny_settings(labels, run), "--epochs", "1", "--sampling", "class_aware",
                                 "--logit-adjustment", "1.0"])
    assert result.exit_code == 0, result.output
    card = read_card(run / "model.safetensors")
    assert card.training["sampling"] == "class_aware" and card.training["logit_adjustment"] == 1.0
    bad = runner.invoke(app, ["train", *tiny_settings(labels, tmp_path / "bad"), "--sampling", "balanced"])
    assert bad.exit_code == 2


def test_the_head_has_its_own_learning_rate_and_norms_and_embeddings_no_weight_decay(tmp_path):
    """Parameter groups: the backbone at lr, the head at head_lr; norms, biases and the
    decoder's label queries without weight decay; all of it on the card."""
    import torch

    from cxrtool.models.checkpoint import read_card
    from cxrtool.models.network import CXRClassifier
    from cxrtool.train import load_config
    from cxrtool.train.loop import parameter_groups

    labels = make_generic_dataset(tmp_path / "data", n=24)
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", *tiny_settings(labels, run, head_dim=16, decoder_layers=1, head_lr=0.0002, lr=0.002),
                                 "--head", "decoder", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    record = read_card(run / "model.safetensors").training["optimiser"]
    assert record["backbone"]["lr"] == 0.002 and record["head"]["lr"] == 0.0002 and record["warmup_epochs"] == 1.0
    assert {"head.queries", "backbone.bn1.weight", "backbone.bn1.bias", "head.class_bias"} <= set(record["no_decay"])
    assert not {"backbone.conv1.weight", "head.class_weight", "head.project.weight"} & set(record["no_decay"])
    # every trainable parameter in exactly one group, at the group's settings
    model = CXRClassifier("resnet18", ["Disk", "Bar"], head="decoder", head_settings={"dim": 16, "layers": 1})
    config = load_config(None, {"labels": str(labels), "lr": 0.002, "head_lr": 0.0002, "weight_decay": 0.01})
    groups, _ = parameter_groups(model, config)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()) and len(set(grouped)) == len(grouped)
    by_name = {group["name"]: group for group in groups}
    assert by_name["head"]["lr"] == 0.0002 and by_name["backbone"]["weight_decay"] == 0.01
    assert by_name["head (no decay)"]["weight_decay"] == 0.0
    assert any(p is model.head.queries for p in by_name["head (no decay)"]["params"])
    assert isinstance(torch.optim.AdamW(groups), torch.optim.AdamW)


@pytest.mark.slow
def test_a_dual_branch_model_trains_its_text_side_and_keeps_its_prompts(tmp_path):
    from cxrtool.models.checkpoint import load_checkpoint
    from cxrtool.models.text import encoder_installed

    if not encoder_installed():
        pytest.skip("the sentence encoder (cxrtool[text]) is not installed")
    labels = make_generic_dataset(tmp_path / "data", n=24)
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("Disk:\n  positive: [a bright round disk, a white circle]\n  negative: [no disk]\n")
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", *tiny_settings(labels, run), "--epochs", "1", "--preset", "dual-branch",
                                 "--set", f"prompts={prompts}"])
    assert result.exit_code == 0, result.output
    model, card = load_checkpoint(run / "model.safetensors")
    assert card.text["dim"] == 384 and card.training["loss"] == "1.5*asl+align"
    assert card.text["prompts"]["Disk"] == {"positive": ["a bright round disk", "a white circle"], "negative": ["no disk"]}
    assert card.text["prompts"]["Bar"]["negative"] == ["no bar"]  # no description: its name against "no bar"
    norms = model.text.prompts.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))  # the pairs travel with the weights
    output = model(torch.zeros(2, 1, 32, 32), full=True)
    assert output.zero_shot_logits.shape == (2, 2) and output.projection.shape == (2, 384)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 2)  # predict's contract: logits only
    missing = runner.invoke(app, ["train", *tiny_settings(labels, tmp_path / "bad"), "--set", "zero_shot=true"])
    assert missing.exit_code == 2 and "zero_shot trains its text branch through the align loss term" in missing.output


def test_a_finding_never_positive_in_training_is_warned_of(tmp_path):
    labels = make_generic_dataset(tmp_path / "data", n=16)
    rows = labels.read_text().splitlines()
    labels.write_text("\n".join([rows[0] + ",Goiter"] + [row + ",0" for row in rows[1:]]) + "\n")
    result = runner.invoke(app, ["train", *tiny_settings(labels, tmp_path / "run", epochs=1)])
    assert result.exit_code == 0, result.output
    assert "warning: 1 of 3 findings never positive in the training split (Goiter)" in result.output


@pytest.mark.parametrize("bf16_units", [True, False])
def test_training_runs_in_bf16_on_a_cpu_with_bf16_units_and_says_so_on_the_card(bf16_units, tmp_path, monkeypatch):
    import cxrtool.models.network as network

    monkeypatch.setattr(network, "_cpu_has_bf16_units", lambda: bf16_units)
    assert network.mixed_precision(torch.device("cpu")) == (torch.bfloat16 if bf16_units else None)
    assert network.mixed_precision(torch.device("meta")) is None

    # What the convolutions compute in, seen from inside the training run.
    seen: set[torch.dtype] = set()
    original = torch.nn.Conv2d.forward
    monkeypatch.setattr(torch.nn.Conv2d, "forward", _recording(original, seen))
    labels = make_generic_dataset(tmp_path / "data", n=24)
    for amp, out in ((True, "mixed"), (False, "float32")):
        seen.clear()
        result = runner.invoke(app, ["train", *tiny_settings(labels, tmp_path / out, amp=str(amp).lower()), "--epochs", "1"])
        assert result.exit_code == 0, result.output
        card = read_card(tmp_path / out / CHECKPOINT_NAME)
        expected = torch.bfloat16 if amp and bf16_units else torch.float32
        assert card.training["precision"] == str(expected).removeprefix("torch.")
        assert seen == {expected}


def _recording(forward, seen):
    def recorded(self, x):
        out = forward(self, x)
        seen.add(out.dtype)
        return out
    return recorded
