"""The sidecar store: reading sidecars (:func:`read_sidecar`, :func:`iter_sidecars`) and
writing one result into a study's sidecar under its folder's lock (:func:`store_result`,
:func:`settle_failure`), which drops the results a changed file made stale and removes
the pictures they listed."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from cxrtool.io.outputs import SIDECAR_SUFFIX, folder_lock, owned_by, sidecar_path, write_json
from cxrtool.io.records.provenance import Fingerprint
from cxrtool.io.records.schema import NewerSchemaError, Result, Sidecar


def read_sidecar(path: Path) -> Sidecar | None:
    """The sidecar at ``path``; None when there is none or it is not a readable cxrtool
    sidecar (it is then written afresh).

    Raises:
        RecordError: a sidecar from a newer cxrtool (rewriting it would lose what it holds).
    """
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(values, dict) or ("results" not in values and "findings" not in values):
        return None
    try:
        return Sidecar.from_dict(values)
    except NewerSchemaError as error:
        raise NewerSchemaError(f"{path}: {error}") from None
    except (KeyError, TypeError, ValueError):  # RecordError included: not a usable sidecar
        return None


def iter_sidecars(folder: Path, *, recursive: bool = False) -> Iterable[tuple[Path, Sidecar]]:
    """Every readable sidecar in a folder (and below it, with ``recursive``), by path."""
    pattern = f"**/*{SIDECAR_SUFFIX}" if recursive else f"*{SIDECAR_SUFFIX}"
    for path in sorted(folder.glob(pattern)):
        sidecar = read_sidecar(path)
        if sidecar is not None:
            yield path, sidecar


def relative_source(study: Path, folder: Path) -> str:
    """The study's path relative to the folder its sidecar is in."""
    try:
        return os.path.relpath(study.absolute(), folder.absolute())
    except ValueError:  # another drive (Windows)
        return str(study.absolute())


@dataclass
class SidecarUpdate:
    """What writing one result into a sidecar changed."""

    sidecar: Sidecar | None
    replaced: Result | None = None  # this model's earlier result
    stale: list[Result] = field(default_factory=list)  # other models' results of an older content
    removed_files: list[str] = field(default_factory=list)


def store_result(
    folder: Path,
    study: Sidecar,
    result: Result,
    *,
    keep: Callable[[Result, Result], Result] | None = None,
) -> SidecarUpdate:
    """Write ``result`` into the study's sidecar under the folder's lock.

    Results of other models stay, unless they were made from another content of the file
    (stale: dropped, with the pictures they list). ``keep(previous, new)`` may carry parts
    of this model's previous result over (predict keeps explain's maps of the same
    content). Pictures the replaced result listed and the new one does not are removed.
    """
    path = sidecar_path(folder, study.file)
    with folder_lock(folder):
        on_disk = read_sidecar(path)
        update = SidecarUpdate(None)
        merged = replace(study, results=[])
        if on_disk is not None:
            if on_disk.sha256 == study.sha256:
                merged.results = list(on_disk.results)
            else:
                update.stale = list(on_disk.results)
        previous = merged.result_for(result.model.id)
        if previous is not None and keep is not None:
            result = keep(previous, result)
        merged.put(result)
        update.replaced = previous
        write_json(path, merged.to_dict())
        update.sidecar = merged
        kept = set(result.files())
        gone = [*(previous.files() if previous else []), *(f for r in update.stale for f in r.files())]
        update.removed_files = _remove_pictures(folder, study.file, [f for f in gone if f not in kept])
    return update


def settle_failure(folder: Path, study: Path, fingerprint: Fingerprint | None, model_id: str) -> SidecarUpdate:
    """A study that failed now: results made from another content of the file (or of a
    file that is gone) are stale and go, with their pictures, and so does this model's own
    earlier result (its latest attempt failed); other models' results of the same content
    stay, and so do they when the file is there but could not be read at all (nothing says
    it changed)."""
    file_name = study.name
    path = sidecar_path(folder, file_name)
    if not path.is_file():
        return SidecarUpdate(None)
    with folder_lock(folder):
        on_disk = read_sidecar(path)
        if on_disk is None:
            return SidecarUpdate(None)
        if fingerprint is None:
            same = study.exists()  # unreadable now (permissions, a lock): no sign of a change
        else:
            same = on_disk.sha256 == fingerprint.sha256
        gone = [r for r in on_disk.results if not same or r.model.id == model_id]
        if not gone:
            return SidecarUpdate(on_disk)
        on_disk.results = [r for r in on_disk.results if r not in gone]
        if on_disk.results:
            write_json(path, on_disk.to_dict())
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed = _remove_pictures(folder, file_name, [f for r in gone for f in r.files()])
        return SidecarUpdate(on_disk if on_disk.results else None, stale=[] if same else gone, removed_files=removed)


def _remove_pictures(folder: Path, study_name: str, names: Iterable[str]) -> list[str]:
    """Remove files a result listed: only plain names in this folder that belong to the study."""
    removed = []
    for name in dict.fromkeys(names):
        if not owned_by(name, study_name):
            continue  # never follow a path a sidecar names outside its own outputs
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
            removed.append(name)
    return removed
