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


class _StudyInputs:
    """Map-style dataset: index -> decoded, preprocessed study (or the reason it failed)."""

    def __init__(self, paths: Sequence[Path], prep: Preprocessing, *, include_patient_id: bool = False):
        self.paths = paths
        self.prep = prep
        self.include_patient_id = include_patient_id

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
                "tensor": tensor,
                "view_position": study.view_position,
                "pixel_spacing": study.pixel_spacing,
                "identity": study.identity,
                "image_size": list(study.shape),
                "sha256": file_sha256(path),
            }
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


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items  # stacking happens in the main process, only for items that decoded


class _ScoreInWorker:
    """Collate function that also runs the model, inside the decoding worker (CPU only).

    On a CPU the model competes with the decoders for the same cores; intra-op threads in
    one process scale poorly for a small model and spin while waiting. Each worker instead
    decodes a chunk and scores it with its own copy-on-write view of the weights, so every
    core does whole studies end to end and the main process only writes the results.
    """

    def __init__(self, network) -> None:
        self.network = network

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        decoded = [item for item in items if "tensor" in item]
        if decoded:
            for item, scores in zip(decoded, _forward(self.network, [item.pop("tensor") for item in decoded], None)):
                item["scores"] = scores
        return items


def _forward(network, tensors: list[np.ndarray], device) -> np.ndarray:
    """Probabilities for a list of preprocessed studies, as float64 (n, findings)."""
    import torch

    batch = torch.from_numpy(np.stack(tensors))
    autocast = contextlib.nullcontext()
    if device is not None and device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
        autocast = torch.autocast("cuda", dtype=torch.float16)
    with torch.inference_mode(), autocast:
        logits = network(batch.contiguous(memory_format=torch.channels_last))
    return torch.sigmoid(logits.float()).cpu().numpy().astype(np.float64)


def _worker_init(_: int, threads: int = 1) -> None:
    # Each worker decodes one image at a time; extra threads would only fight the model.
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(threads)


def _regroup(chunks: Iterable[list[dict[str, Any]]], size: int) -> Iterable[list[dict[str, Any]]]:
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
    import torch

    from cxrtool import __version__
    from cxrtool.models.checkpoint import file_sha256, load_checkpoint
    from cxrtool.models.network import pick_device

    torch_device = pick_device(device)
    network, card = load_checkpoint(model, device=str(torch_device))
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

    # Studies already done by this model are skipped; their rows still go into the CSV so
    # that it stays complete.
    todo: list[Path] = []
    for path in paths:
        folder = destination(path)
        previous = _read_previous(sidecar_path(folder, path.name)) if not overwrite else None
        if previous is not None and previous.get("model", {}).get("sha256") == model_info["sha256"]:
            summary.skipped += 1
            tables.update(folder, path.name, _row_values(previous))
            report({**previous, "status": "skipped"})
        else:
            todo.append(path)

    dataset = _StudyInputs(todo, prep, include_patient_id=include_patient_id)
    n_workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if torch_device.type == "cpu" and n_workers:
        # Workers decode and score chunks of a few studies (see _ScoreInWorker); small
        # chunks keep a run of slow studies (large JPEG 2000 DICOMs) from piling up in one
        # worker while the others idle.
        chunk, collate = min(batch_size, 8), _ScoreInWorker(network)
        init = functools.partial(_worker_init, threads=max(1, (os.cpu_count() or 1) // n_workers))
    else:
        # The model runs here on the device; workers hand over one study at a time and
        # the model batches are formed from them as they arrive.
        chunk, collate, init = 1, _collate, _worker_init
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=chunk,
        num_workers=n_workers,
        collate_fn=collate,
        worker_init_fn=init if n_workers else None,
        prefetch_factor=max(2, batch_size // chunk) if n_workers else None,
    )
    try:
        for items in _regroup(loader, batch_size):
            decoded = [item for item in items if "tensor" in item]
            if decoded:
                for item, scores in zip(decoded, _forward(network, [item.pop("tensor") for item in decoded], torch_device)):
                    item["scores"] = scores
            for item in items:
                path = todo[item["index"]]
                folder = destination(path)
                if "error" in item:
                    summary.failed.append((str(path), item["error"]))
                    tables.update(folder, path.name, {"error": item["error"]})
                    report({"file": path.name, "path": str(path), "status": "failed", "error": item["error"]})
                    continue
                record = _record(path, item, item["scores"], card, thresholds, model_info, __version__)
                write_json(sidecar_path(folder, path.name), record)
                tables.update(folder, path.name, _row_values(record))
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
    return summary


def _read_previous(path: Path) -> dict[str, Any] | None:
    import json

    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None  # unreadable sidecar: predict again
    return record if isinstance(record, dict) and "findings" in record else None


def _record(path, item, scores, card, thresholds, model_info, version) -> dict[str, Any]:
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


def _row_values(record: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {name: v["probability"] for name, v in record.get("findings", {}).items()}
    values["view_position"] = record.get("view_position", "")
    return values
