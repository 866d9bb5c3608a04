"""The Python API behind ``cxrtool predict``: studies -> batches -> model -> sidecars and tables.

The journey itself (finding, skipping what is done, decoding in workers, batching, the
output stages: sidecars, folder tables) is :func:`cxrtool.runner.run_studies`, shared with
``explain``; this module adds the processor that scores a batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from cxrtool.engines import Engine
from cxrtool.io.decoded import DecodedStudy
from cxrtool.io.records import Result, StudyFailure
from cxrtool.models.scoring import ZeroShot
from cxrtool.preprocess import NO_TTA, TestTimeAugmentation
from cxrtool.runner import (
    PredictSummary,
    ProgressCallback,
    ResultCallback,
    RunContext,
    RunOptions,
    RunSummary,
    output_root,
    regroup,
    run_studies,
)
from cxrtool.stages import OutputKind, OutputStage, extra_stages, standard_stages

__all__ = ["PREDICT_SETTINGS", "PredictSummary", "RunOptions", "RunSummary", "ScoreChunk", "output_root", "predict",
           "predict_stages", "regroup"]

# What of predict changes a result beyond the model and the file: test-time augmentation
# (TestTimeAugmentation.settings), nothing without it. Recorded with each result; a change
# makes studies be done again.
PREDICT_SETTINGS: dict[str, Any] = {}


class ScoreChunk:
    """The chunk processor of ``predict``: score decoded studies.

    It runs where the model runs (see :mod:`cxrtool.runner`). Items
    (:class:`~cxrtool.io.decoded.DecodedStudy`) come back with their ``result`` (or their
    ``error``); the run's output stages store them.
    """

    def __init__(self, context: RunContext) -> None:
        self.context = context

    def __call__(self, items: list[DecodedStudy]) -> list[DecodedStudy]:
        context = self.context
        decoded = [item for item in items if item.tensors is not None]
        if decoded:
            scores = context.scorer.score(decoded)
            for item, scored in zip(decoded, scores, strict=True):
                item.tensors = None  # used: what travels back from a worker stays small
                try:
                    item.result = context.result(item, scored)
                except StudyFailure as failure:
                    item.error = str(failure)
        return items


def keep_explanations(previous: Result, new: Result) -> Result:
    """Predicting a study again with the same model, content and predict settings gives the
    same probabilities: the maps ``explain`` made of them stay valid and stay with the result."""
    same = previous.settings.get("predict", {}) == new.settings.get("predict", {})
    if previous.explanations is not None and "explain" in previous.settings and same:
        new.explanations = previous.explanations
        new.settings = {**new.settings, "explain": previous.settings["explain"]}
    return new


def predict(
    inputs: Iterable[str | os.PathLike],
    *,
    model: str | os.PathLike,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    batch_size: int = 16,
    workers: int | None = None,
    device: str = "auto",
    include_patient_id: bool = False,
    runtime: str = "auto",
    on_result: ResultCallback | None = None,
    progress: ProgressCallback | None = None,
    note: Callable[[str], None] | None = None,
    views: str | os.PathLike | None = None,
    tta: TestTimeAugmentation | None = None,
    zero_shot: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    outputs: Sequence[str | OutputKind] = (),
    stdin=None,
    cache: str | os.PathLike | None = None,
    engine: str | Engine = "local",
    ray_address: str | None = None,
) -> RunSummary:
    """Run a checkpoint over studies and write sidecars and folder tables.

    A study is skipped when its sidecar holds this model's result made from the same file
    content (:func:`cxrtool.io.records.is_done`); results of other models are never
    touched, except those made from an earlier content of a file that has changed since
    (stale: dropped, and counted in ``summary.stale``).

    Args:
        inputs: files, folders (recursive), globs, ``-`` for paths on stdin, or studies on a
            DICOMweb server (``dicomweb://HOST:PORT/PATH/studies/UID``, a series, or a query
            ``.../studies?PatientID=ID``: :mod:`cxrtool.io.dicomweb`), fetched into ``cache``.
        model: a cxrtool checkpoint (``.safetensors``) or a bundle (``.yaml``, see
            :mod:`cxrtool.models.sources.bundle`).
        out: write into a mirror tree under this folder instead of beside the inputs.
        overwrite: predict again studies that are already done.
        batch_size: studies per forward pass.
        workers: decoding processes (default: the CPU count, at most 8; 0 decodes inline).
            On a CPU with a worker per core they also run the model.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        include_patient_id: add the DICOM PatientID to outputs (off: outputs carry no IDs).
        runtime: ``auto`` (ONNX Runtime on a CPU when installed, else PyTorch), ``torch`` or
            ``onnx`` (see :mod:`cxrtool.models.runtime`).
        on_result: called with each study's record (done, skipped or failed), in order.
        progress: called with (studies finished, total).
        note: called with what the run says along the way (a one-time export).
        views: a label or metadata table (NIH, CheXpert, MIMIC-CXR metadata, or path and
            view columns) giving the projection of studies whose files do not say it; a
            bundle routes by it.
        tta: test-time augmentation (:class:`~cxrtool.preprocess.TestTimeAugmentation`):
            each study's copies scored in the same forward passes, their probabilities
            averaged; recorded with each result.
        zero_shot: findings the model never trained on -> their prompts (``{"positive": [...],
            "negative": [...]}``, see :func:`cxrtool.models.text.read_prompts`): each scored
            from the image's text-space embedding (a dual-branch model), marked zero-shot
            and uncalibrated (called at 0.5) in the sidecar.
        outputs: output stages to add after the sidecars and tables: names registered in
            :data:`cxrtool.stages.OUTPUT_STAGE_MODULES`, or :class:`~cxrtool.stages.OutputKind`
            of a script's own (:func:`cxrtool.reports.store.store_to` sends the DICOM
            objects to a PACS).
        cache: where studies from a DICOMweb server are cached, their outputs beside them
            (default: ``out/dicomweb``).
        engine: "local" (this machine) or "ray" (a Ray cluster: :mod:`cxrtool.ray_engine`;
            ``ray_address`` the cluster's, "auto" the one the environment names, None a Ray
            instance started here for the run). The files written are the same.

    Returns:
        A :class:`RunSummary`.

    Example:
        >>> summary = predict(["study/"], model="demo.safetensors")
        >>> summary.predicted, summary.exit_code
    """
    tta = tta or NO_TTA
    # Embedded once the model is known to take prompts (open_model checks it first).
    unseen = ZeroShot({name: {side: list(texts) for side, texts in entry.items()}
                       for name, entry in zero_shot.items()}) if zero_shot else None
    settings = {**PREDICT_SETTINGS, **tta.settings(), **(unseen.settings() if unseen else {})}
    options = RunOptions(out=out, overwrite=overwrite, batch_size=batch_size, workers=workers, device=device,
                         runtime=runtime, include_patient_id=include_patient_id, views=views, on_result=on_result,
                         progress=progress, note=note, stdin=stdin, cache=cache, engine=engine,
                         ray_address=ray_address)
    return run_studies(inputs, model=model, make_processor=ScoreChunk, settings={"predict": settings}, options=options,
                       make_stages=lambda context: predict_stages(context, outputs), tta=tta, zero_shot=unseen)


def predict_stages(context: RunContext, outputs: Sequence[str | OutputKind] = ()) -> list[OutputStage]:
    """What ``predict`` writes: any ``outputs`` first (what they write is listed in the
    result), the sidecars (keeping explain's maps of the same probabilities,
    :func:`keep_explanations`), then the folder tables."""
    return [*extra_stages(context, outputs),
            *standard_stages(context.model, context.scorer, context.version, keep=keep_explanations)]
