"""The Python API behind ``cxrtool predict``: studies -> batches -> model -> outputs.

Decoding and preprocessing run in worker processes (a torch DataLoader over the list of
paths), the model runs batched on the chosen device, and each result is written as soon as
its batch is done: a JSON sidecar per study and one CSV per folder. Memory stays flat in
the number of inputs: only paths and the small result rows are kept, never pixels.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool._workers import fork_safe_opencv, worker_init
from cxrtool.io.outputs import FOLDER_JSON, FolderTables, sidecar_path, write_json
from cxrtool.io.studies import StudyReadError, find_studies, one_line, read_study
from cxrtool.preprocess import Preprocessing, prepare

ResultCallback = Callable[[dict[str, Any]], None]
ProgressCallback = Callable[[int, int], None]


@dataclass
class PredictSummary:
    """What a prediction run did; ``exit_code`` follows the CLI's convention."""

    total: int = 0
    predicted: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.total == 0:
            return 2
        return 1 if self.failed else 0


class StudyInputs:
    """Map-style dataset: index -> decoded, preprocessed study (or the reason it failed)."""

    def __init__(
        self, paths: Sequence[Path], prep: Preprocessing, *, include_patient_id: bool = False, display_size: int | None = None
    ):
        self.paths = paths
        self.prep = prep
        self.include_patient_id = include_patient_id
        self.display_size = display_size  # also hand over the geometry and a uint8 picture this big

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from cxrtool.models.checkpoint import file_sha256

        path = self.paths[index]
        try:
            study = read_study(path)
            tensor, geometry = prepare(study.pixels, self.prep)
            item = {
                "index": index,
                "path": str(path),
                "tensor": tensor,
                "view_position": study.view_position,
                "pixel_spacing": study.pixel_spacing,
                "identity": study.identity,
                "image_size": list(study.shape),
                "sha256": file_sha256(path),
            }
            if self.display_size:
                item["geometry"] = geometry
                item["display"] = _display(study.pixels, self.display_size)
            if self.include_patient_id and study.source_format == "dicom":
                item["patient_id"] = _patient_id(path)
            if study.pixels.size > _TRIM_ABOVE_PIXELS:
                del study
                _release_freed_memory()
            return item
        except StudyReadError as error:
            return {"index": index, "error": str(error)}
        except FileNotFoundError:
            return {"index": index, "error": "no such file"}
        except (OSError, ValueError, MemoryError) as error:
            # A decoder failing in a way the readers did not anticipate must not stop the
            # batch: record it as this file's reason.
            return {"index": index, "error": f"{type(error).__name__}: {one_line(str(error), limit=None) or type(error).__name__}"}


def _display(pixels: np.ndarray, longest: int) -> np.ndarray:
    """The radiograph as uint8 with its longer side at most ``longest`` pixels, for pictures."""
    import cv2

    height, width = pixels.shape
    ratio = min(1.0, longest / max(height, width))
    if ratio < 1.0:
        pixels = cv2.resize(pixels, (max(1, round(width * ratio)), max(1, round(height * ratio))), interpolation=cv2.INTER_AREA)
    return np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)


# Decoding a large radiograph allocates tens of MB that glibc keeps for the process after
# they are freed; over thousands of studies of mixed sizes the workers' memory would creep.
_TRIM_ABOVE_PIXELS = 2_000_000


def _release_freed_memory() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc (e.g. musl): nothing to trim


def _patient_id(path: Path) -> str:
    import pydicom

    dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    return str(dataset.get("PatientID", ""))


@dataclass
class RunContext:
    """What a chunk processor needs to turn decoded studies into written results."""

    network: Any
    card: Any
    thresholds: np.ndarray
    model_info: dict[str, Any]
    device: Any
    folders: list[Path]  # output folder of each study to do, by dataset index
    version: str
    overwrite: bool = False  # studies done before by this model are being done again


class ScoreChunk:
    """The chunk processor of ``predict``: score decoded studies, write their sidecars.

    It runs where the model runs: inside the decoding workers on a CPU (each core then does
    whole studies end to end, no intra-op threads fighting the decoders), in the main
    process on a GPU. Items come back with a ``record`` (or their ``error``).
    """

    def __init__(self, context: RunContext) -> None:
        self.context = context

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        context = self.context
        decoded = [item for item in items if "tensor" in item]
        if decoded:
            scores = _forward(context.network, [item.pop("tensor") for item in decoded], context.device)
            for item, row in zip(decoded, scores):
                path = Path(item["path"])
                record = prediction_record(path, item, row, context.card, context.thresholds, context.model_info, context.version)
                target = sidecar_path(context.folders[item["index"]], path.name)
                # Only a study redone by the same model (--overwrite) can have explanations to
                # keep; any other study here had no sidecar from this model.
                previous = read_sidecar(target) if context.overwrite else None
                if previous and "explanations" in previous and _same_model(previous, context.model_info):
                    record["explanations"] = previous["explanations"]  # explain's boxes stay valid
                write_json(target, record)
                item["record"] = record
        return items


def _forward(network, tensors: list[np.ndarray], device) -> np.ndarray:
    """Probabilities for a list of preprocessed studies, as float64 (n, findings)."""
    import torch

    batch = torch.from_numpy(np.stack(tensors))
    autocast = contextlib.nullcontext()
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
        autocast = torch.autocast("cuda", dtype=torch.float16)
    with torch.inference_mode(), autocast:
        logits = network(batch.contiguous(memory_format=torch.channels_last))
    return torch.sigmoid(logits.float()).cpu().numpy().astype(np.float64)


def regroup(chunks: Iterable[list[dict[str, Any]]], size: int) -> Iterable[list[dict[str, Any]]]:
    """Regroup the loader's small chunks into model batches of ``size`` (the last may be short)."""
    pending: list[dict[str, Any]] = []
    for chunk in chunks:
        pending.extend(chunk)
        if len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
    if pending:
        yield pending


def output_root(paths: Sequence[Path]) -> Path | None:
    """The folder that ``--out`` mirrors: the common parent of all input folders."""
    if not paths:
        return None
    parents = {str(p.absolute().parent) for p in paths}
    return Path(os.path.commonpath(sorted(parents)))


ChunkFactory = Callable[[RunContext], Callable[[list[dict[str, Any]]], list[dict[str, Any]]]]


def run_studies(
    inputs: Iterable[str | os.PathLike],
    *,
    model: str | os.PathLike,
    make_processor: ChunkFactory,
    is_done: Callable[[dict[str, Any], dict[str, Any]], bool],
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    batch_size: int = 16,
    workers: int | None = None,
    device: str = "auto",
    include_patient_id: bool = False,
    display_size: int | None = None,
    on_result: ResultCallback | None = None,
    progress: ProgressCallback | None = None,
    on_finish: Callable[[list[Path]], None] | None = None,
    check_model: Callable[[Any, Any], None] | None = None,
    stdin=None,
) -> PredictSummary:
    """The journey ``predict`` and ``explain`` share: find, skip, decode, process, tabulate.

    ``make_processor(context)`` gives the callable that turns a chunk of decoded studies
    into written results (see :class:`ScoreChunk`); ``is_done(previous_sidecar,
    model_info)`` says whether a study's existing sidecar already holds this run's result;
    ``check_model(network, card)`` may refuse the request (by raising) before any study is
    looked at.
    """
    import torch

    from cxrtool import __version__
    from cxrtool.models.checkpoint import file_sha256, load_checkpoint
    from cxrtool.models.network import pick_device

    torch_device = pick_device(device)
    network, card = load_checkpoint(model, device=str(torch_device))
    if check_model is not None:
        check_model(network, card)
    # Channels-last convolutions are markedly faster on CPUs (oneDNN) and tensor cores.
    network = network.to(memory_format=torch.channels_last)
    model_info = {"name": card.name, "architecture": card.architecture, "sha256": file_sha256(model)}
    prep = Preprocessing.from_dict(card.preprocessing)
    thresholds = np.array([card.threshold_for(f) for f in card.findings], dtype=np.float64)

    paths = list(find_studies(inputs, stdin=stdin))
    summary = PredictSummary(total=len(paths))
    root = output_root(paths)
    out_dir = Path(out) if out is not None else None
    tables = FolderTables(card.findings)

    def destination(path: Path) -> Path:
        if out_dir is None:
            return path.parent
        relative = path.absolute().parent.relative_to(root) if root else Path()
        return out_dir / relative

    finished = 0

    def report(record: dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        if on_result is not None:
            on_result(record)
        if progress is not None:
            progress(finished, summary.total)

    # Studies already done are skipped; their rows still go into the CSV so that it stays
    # complete.
    todo: list[Path] = []
    for path in paths:
        folder = destination(path)
        previous = read_sidecar(sidecar_path(folder, path.name)) if not overwrite else None
        if previous is not None and is_done(previous, model_info):
            summary.skipped += 1
            tables.update(folder, path.name, csv_values(previous))
            report({**previous, "path": str(path), "status": "skipped"})
        else:
            todo.append(path)

    context = RunContext(network, card, thresholds, model_info, torch_device, [destination(p) for p in todo], __version__,
                         overwrite)
    processor = make_processor(context)
    dataset = StudyInputs(todo, prep, include_patient_id=include_patient_id, display_size=display_size)
    n_workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    in_workers = torch_device.type == "cpu" and n_workers > 0
    if in_workers:
        # Workers decode and process chunks of a few studies; small chunks keep a run of
        # slow studies (large JPEG 2000 DICOMs) from piling up in one worker.
        chunk, collate = min(batch_size, 8), processor
        init = functools.partial(worker_init, threads=max(1, (os.cpu_count() or 1) // n_workers))
    else:
        # The model runs here on the device; workers hand over one study at a time and
        # the batches are formed from them as they arrive.
        chunk, collate, init = 1, _collate, worker_init
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_chunks(len(dataset), chunk, tail=n_workers * chunk),
        num_workers=n_workers,
        collate_fn=collate,
        worker_init_fn=init if n_workers else None,
        prefetch_factor=max(2, batch_size // chunk) if n_workers else None,
    )
    with fork_safe_opencv():
        chunks = iter(loader)  # starts (forks) the workers
    try:
        for items in regroup(chunks, batch_size):
            if not in_workers:
                items = processor(items)
            for item in items:
                path = todo[item["index"]]
                folder = context.folders[item["index"]]
                if "error" in item:
                    summary.failed.append((str(path), item["error"]))
                    tables.update(folder, path.name, {"error": item["error"]})
                    report({"file": path.name, "path": str(path), "status": "failed", "error": item["error"]})
                    continue
                record = item["record"]
                tables.update(folder, path.name, csv_values(record))
                summary.predicted += 1
                report({**record, "path": str(path), "status": "predicted"})
    finally:
        tables.flush()
        for folder in tables.tables:
            write_json(
                folder / FOLDER_JSON,
                {
                    "model": model_info,
                    "findings": list(card.findings),
                    "thresholds": {f: float(t) for f, t in zip(card.findings, thresholds)},
                    "threshold_method": card.threshold_method,
                    "cxrtool_version": __version__,
                },
            )
        summary.folders = sorted(tables.tables)
        if on_finish is not None:
            on_finish(summary.folders)
    return summary


def _chunks(n: int, size: int, *, tail: int) -> list[list[int]]:
    """Indices 0..n-1 in order, in chunks of ``size``, but one by one for the last ``tail``:
    the workers then finish together instead of one of them decoding a last chunk alone."""
    split = max(0, n - tail)
    return [list(range(i, min(i + size, split))) for i in range(0, split, size)] + [[i] for i in range(split, n)]


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items  # batches are stacked by the processor, only from items that decoded


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
    on_result: ResultCallback | None = None,
    progress: ProgressCallback | None = None,
    stdin=None,
) -> PredictSummary:
    """Run a checkpoint over studies and write sidecars and folder CSVs.

    Args:
        inputs: files, folders (recursive), globs, or ``-`` for paths on stdin.
        model: a cxrtool checkpoint (``.safetensors``).
        out: write into a mirror tree under this folder instead of beside the inputs.
        overwrite: predict again studies whose sidecar (from this model) exists.
        batch_size: studies per forward pass.
        workers: decoding processes (default: the CPU count, at most 8; 0 decodes inline).
            On a CPU they also run the model.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        include_patient_id: add the DICOM PatientID to outputs (off: outputs carry no IDs).
        on_result: called with each study's record (done, skipped or failed), in order.
        progress: called with (studies finished, total).

    Returns:
        A :class:`PredictSummary`.

    Example:
        >>> summary = predict(["study/"], model="demo.safetensors")
        >>> summary.predicted, summary.exit_code
    """
    return run_studies(
        inputs, model=model, make_processor=ScoreChunk, is_done=_same_model, out=out, overwrite=overwrite,
        batch_size=batch_size, workers=workers, device=device, include_patient_id=include_patient_id,
        on_result=on_result, progress=progress, stdin=stdin,
    )


def _same_model(previous: dict[str, Any], model_info: dict[str, Any]) -> bool:
    return previous.get("model", {}).get("sha256") == model_info["sha256"]


def read_sidecar(path: Path) -> dict[str, Any] | None:
    import json

    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None  # unreadable sidecar: predict again
    return record if isinstance(record, dict) and "findings" in record else None


def prediction_record(path, item, scores, card, thresholds, model_info, version) -> dict[str, Any]:
    findings = {
        name: {
            "probability": round(float(p), 6),
            "threshold": round(float(t), 6),
            "positive": bool(p >= t),
        }
        for name, p, t in zip(card.findings, scores, thresholds)
    }
    record: dict[str, Any] = {
        "file": path.name,
        "sha256": item["sha256"],
        **{k: v for k, v in item["identity"].items() if k in ("sop_instance_uid", "transfer_syntax", "format")},
        "view_position": item["view_position"],
        "pixel_spacing_mm": list(item["pixel_spacing"]) if item["pixel_spacing"] else None,
        "image_size": item["image_size"],
        "model": model_info,
        "findings": findings,
        "positive_findings": [name for name, value in findings.items() if value["positive"]],
        "cxrtool_version": version,
    }
    if "patient_id" in item:
        record["patient_id"] = item["patient_id"]
    return record


def csv_values(record: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {name: v["probability"] for name, v in record.get("findings", {}).items()}
    values["view_position"] = record.get("view_position", "")
    return values
