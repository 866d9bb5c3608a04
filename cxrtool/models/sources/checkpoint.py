"""cxrtool's own checkpoints as a model source: a ``.safetensors`` file with its card
(:mod:`cxrtool.models.checkpoint`), opened into a
:class:`~cxrtool.models.scoring.CheckpointScorer` (PyTorch, or its ONNX graph on a CPU).
The fallback source: a model argument no other source claims is read as a checkpoint,
and a file that is not one is refused with the reason."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cxrtool.models.scoring import CheckpointScorer, ZeroShot
from cxrtool.models.sources import ModelSource
from cxrtool.preprocess import NO_TTA, Preprocessing, TestTimeAugmentation


def identify_checkpoint(model: str | os.PathLike) -> tuple[str, dict[str, float]]:
    """The checkpoint's SHA-256 (what its results carry) and its thresholds, from its card."""
    from cxrtool.models.checkpoint import file_sha256, read_card

    card = read_card(model)
    return file_sha256(model), {f: card.threshold_for(f) for f in card.findings}


def open_checkpoint(model: str | os.PathLike, *, device, runtime: str = "torch", note: Callable[[str], None] | None = None,
                    sha256: str | None = None, tta: TestTimeAugmentation = NO_TTA,
                    zero_shot: ZeroShot | None = None) -> CheckpointScorer:
    """The checkpoint loaded onto ``device``, ready to score (exported once for ONNX Runtime
    when that runs it; zero-shot prompts need its text branch and PyTorch).

    Raises:
        CheckpointError: a file that is not a usable checkpoint.
        UsageError: zero-shot prompts it cannot score.
    """
    import torch

    from cxrtool.models.checkpoint import file_sha256, load_checkpoint
    from cxrtool.models.runtime import OnnxNetwork, cache_folder
    from cxrtool.models.runtime import choose as choose_runtime
    from cxrtool.models.runtime import export as export_onnx

    path = Path(model)
    network, card = load_checkpoint(path, device=str(device))
    sha256 = sha256 or file_sha256(path)
    if zero_shot is not None:
        check_zero_shot(path, card, zero_shot, runtime)
        zero_shot = zero_shot.embedded()
        runtime = "torch"  # the exported graph gives logits only; the text branch runs in PyTorch
    onnx = None
    if choose_runtime(runtime, device.type) == "onnx":
        graph = cache_folder() / "onnx"
        if note is not None and not any(graph.glob(f"{sha256[:16]}-*")):
            note(f"exporting {card.name} for ONNX Runtime, once (into {graph})")
        onnx = OnnxNetwork(export_onnx(network, Preprocessing.from_dict(card.preprocessing).input_size, sha256))
    # Channels-last convolutions are markedly faster on CPUs (oneDNN) and tensor cores.
    network = network.to(memory_format=torch.channels_last)
    return CheckpointScorer(path, network, card, device, sha256=sha256, onnx=onnx, tta=tta, zero_shot=zero_shot)


def already_scored(names: Sequence[str], findings: Sequence[str]) -> list[str]:
    """The prompted names that are trained findings under any spelling (``Pleural
    Effusion`` is ``Effusion``; case and underscores aside)."""
    from cxrtool.registry import finding_key

    trained = {finding_key(finding) for finding in findings}
    return [name for name in names if finding_key(name) in trained]


def check_zero_shot(path: Path, card, zero_shot: ZeroShot, runtime: str) -> None:
    """Refuse zero-shot prompts a checkpoint cannot score (no text branch, another encoder,
    ONNX Runtime, a prompt for a finding it was trained on).

    Raises:
        UsageError: with the reason and the fix.
    """
    from cxrtool.errors import UsageError
    from cxrtool.models.text import ENCODER_NAME

    if not card.text:
        raise UsageError(f"{path}: zero-shot prompts need a dual-branch model (train one with --preset dual-branch); "
                         "this one has no text branch")
    if card.text.get("encoder") != ENCODER_NAME:
        raise UsageError(f"{path}: its text branch was trained against {card.text.get('encoder')}, not {ENCODER_NAME}")
    if runtime == "onnx":
        raise UsageError(f"{path}: zero-shot scoring runs in PyTorch: use --runtime torch (or auto)")
    trained = already_scored(zero_shot.names, card.findings)
    if trained:
        raise UsageError(f"{trained[0]!r} is a finding the model was trained on: its own head scores it; "
                         "zero-shot is for findings it never saw")


def _is_path(model: Any) -> bool:
    return isinstance(model, str | os.PathLike)


SOURCE = ModelSource(
    name="checkpoint",
    description="a cxrtool checkpoint (.safetensors: weights and model card)",
    matches=_is_path,
    identify=identify_checkpoint,
    open=open_checkpoint,
)
