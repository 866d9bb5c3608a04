"""The Python API behind ``cxrtool explain``: studies -> batches -> CAMs -> pictures, masks, boxes.

``explain`` walks the same path as ``predict`` (same reading, preprocessing, batching,
skipping and folder CSV; the sidecar gets the same prediction record) and adds one stage:
for each study and each finding asked for (by default the ones the model calls positive),
a class activation map from the grad-cam package, written as

- ``NAME.cxrtool.<model id>.<Finding>.overlay.png``: the heatmap on the radiograph, with
  the finding, its probability and the regions' boxes in the picture;
- ``NAME.cxrtool.<model id>.<Finding>.map.png`` (16-bit, the map divided by its peak; the
  peak's raw value is ``map_max`` in the sidecar) or ``.map.npy`` (raw float32), at the
  radiograph's own resolution;
- ``NAME.cxrtool.<model id>.<Finding>.mask.png``: the thresholded map's regions at the
  radiograph's resolution, pixel value k for region k (strongest first), 0 outside;
- in the sidecar ``NAME.cxrtool.json``, in the model's result: ``explanations``, with each
  region's box ``[x, y, w, h]`` in original pixels (and millimetres), peak and mean
  activation, the map's peak point, and ``trust``: whether the map's peak and most of its
  weight lie on the chest (:mod:`cxrtool.explain.chest`; ``outside_chest`` and a reason
  when not, also written on the overlay);

(the model id, the first digits of the checkpoint's SHA-256, keeps the pictures of two
models of the same study apart)

and a contact sheet per folder, ``cxrtool_explain.html``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cxrtool.engines import Engine
from cxrtool.errors import OutputError, UsageError
from cxrtool.explain.chest import NO_CHEST, ChestMask, chest_mask, judge_map, region_chest_shares
from cxrtool.explain.regions import find_regions, parse_threshold, peak_point, to_original
from cxrtool.explain.render import contact_sheet, overlay, write_png
from cxrtool.io.decoded import DecodedStudy
from cxrtool.io.outputs import atomic_write, output_stem
from cxrtool.io.records import Explanation, FindingMap, Result, StudyFailure, read_sidecar, sidecar_path
from cxrtool.predict import PREDICT_SETTINGS
from cxrtool.registry import ATTENTION_METHOD, CAM_METHOD_LABELS, DEFAULT_CAM_METHOD, MAP_FORMATS, OCCLUSION_METHOD
from cxrtool.runner import ProgressCallback, ResultCallback, RunContext, RunOptions, RunSummary, run_studies
from cxrtool.stages import OutputKind, OutputStage, StudyOutcome, extra_stages, standard_stages

METHOD_LABELS = CAM_METHOD_LABELS  # the name the first release exported

# Output stages whose files are made from a result's maps (cxrtool.reports.seg: the DICOM
# SEG): new maps of a stored result do not keep them listed, so the old files go (the
# stale-file rule, cxrtool.stages); a run that asks for them writes them anew.
MAP_OUTPUTS = frozenset({"seg"})


@dataclass(frozen=True)
class ExplainSettings:
    """What to explain and how; recorded in each sidecar, so a re-run can skip work done.

    Attributes:
        method: a key of ``registry.CAM_METHOD_LABELS``: a grad-cam method, or ``attention``
            (a decoder head's own cross-attention).
        layer: target layer's module name; None takes the one the checkpoint's backbone is known by.
        findings: finding names to map for every study, or None for each study's positive calls.
        threshold: fraction of a map's peak, or "otsu", for the regions.
        map_format: "png" (16-bit) or "npy" (raw float32).
        display_size: longest side of the overlay pictures, in pixels.
        faithfulness: also measure each map's deletion and insertion curves with the model
            (:mod:`cxrtool.explain.faithfulness`; 34 more forward passes a map) and record
            them in the sidecar, for ``evaluate --boxes``.
    """

    method: str = DEFAULT_CAM_METHOD
    layer: str | None = None
    findings: tuple[str, ...] | None = None
    threshold: float | str = 0.5
    map_format: str = "png"
    display_size: int = 512
    faithfulness: bool = False

    def __post_init__(self) -> None:
        if self.method not in CAM_METHOD_LABELS:
            raise UsageError(f"unknown CAM method {self.method!r}; choose one of {', '.join(CAM_METHOD_LABELS)}")
        if self.map_format not in MAP_FORMATS:
            raise UsageError(f"map format must be one of {', '.join(MAP_FORMATS)}, got {self.map_format!r}")
        if self.display_size < 64:
            raise UsageError(f"overlay size must be at least 64 pixels, got {self.display_size}")
        try:
            object.__setattr__(self, "threshold", parse_threshold(self.threshold))
        except ValueError as error:
            raise UsageError(str(error)) from None

    def request(self) -> dict[str, Any]:
        values = asdict(self)
        values["findings"] = list(self.findings) if self.findings is not None else "positive"
        if not self.faithfulness:
            del values["faithfulness"]  # the records of runs without it stay "already done"
        return values


def file_slug(finding: str) -> str:
    """A finding's name as it appears in file names: ``Pleural Thickening`` ->
    ``Pleural_Thickening``; at most 32 characters (a longer one ends in a digest of it)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", finding).strip("_") or "finding"
    if len(slug) > 32:
        slug = f"{slug[:21]}_{hashlib.sha256(finding.encode()).hexdigest()[:10]}"
    return slug


class ExplainChunk:
    """The chunk processor of ``explain`` (see :class:`cxrtool.predict.ScoreChunk`).

    Runs where the model runs (inside the decoding workers on a CPU); builds its CAM
    engines on first use, in that process, so the hooks live where the model does.

    One checkpoint: one pass gives the probabilities and the maps. A bundle: the bundle
    scores the studies (routes, merge, its thresholds), then each member of a study's route
    maps the findings asked for that it has; each member's map, on the study's own pixel
    grid and scaled to its peak, is averaged over the members that scored that finding.
    """

    def __init__(self, context: RunContext, settings: ExplainSettings) -> None:
        self.context = context
        self.settings = settings
        self.scorer = context.scorer
        self.bundle = self.scorer.bundle
        findings = list(self.scorer.findings)
        fixed = dict.fromkeys(settings.findings) if settings.findings is not None else None  # in order, once each
        self.fixed = [findings.index(name) for name in fixed] if fixed is not None else None
        self._engines: dict[str, Any] = {}
        self._threads = None

    def engine(self, name: str = ""):
        """The map engine of the checkpoint (or of the bundle's member ``name``)."""
        from cxrtool.explain.cams import make_engine

        if name not in self._engines:
            network = self.scorer.members[name].network if name else self.scorer.network
            self._engines[name] = make_engine(network, self.settings.method, None if name else self.settings.layer)
        return self._engines[name]

    def _wanted(self, probabilities: np.ndarray, stored: Sequence[Result | None]) -> list[list[int]]:
        """Per study, the findings to map: those asked for, else the positive calls of the
        stored result explain builds on, else of its own pass."""
        if self.fixed is not None:
            return [list(self.fixed) for _ in range(len(probabilities))]
        calls = self.scorer.calibrated(probabilities)
        own = [[int(i) for i in np.flatnonzero(row >= self.scorer.thresholds)] for row in calls]
        return [own[row] if base is None else self._positives(base) for row, base in enumerate(stored)]

    def _positives(self, base: Result) -> list[int]:
        """The stored result's positive calls, as the model's finding indices (a zero-shot
        finding predict added has no map: it is not among them)."""
        findings = list(self.scorer.findings)
        return [findings.index(name) for name in base.positive_findings if name in findings]

    def _stored(self, item: DecodedStudy) -> Result | None:
        """The result explain builds on: this model's result in the study's sidecar, made
        from the same file content by a ``predict`` stage (whatever its settings: TTA,
        zero-shot findings), or None (explain then scores the study itself, with predict's
        default settings)."""
        context = self.context
        path = context.paths[item.index]
        sidecar = read_sidecar(sidecar_path(context.folders[item.index], path.name))
        fingerprint = item.fingerprint
        if sidecar is None or fingerprint is None or sidecar.sha256 != fingerprint.sha256:
            return None
        found = sidecar.result_for(context.model.id)
        if found is None or found.model.sha256 != context.model.sha256 or "predict" not in found.settings:
            return None
        return found

    def __call__(self, items: list[DecodedStudy]) -> list[DecodedStudy]:
        decoded = [item for item in items if item.tensors is not None]
        if decoded:
            jobs = self._bundle_jobs(decoded) if self.bundle is not None else self._checkpoint_jobs(decoded)
            if self.context.in_worker:
                for job in jobs:  # a decoding worker: one core, one study at a time
                    self._finish(*job)
            else:
                # In the main process (a GPU, or a CPU with spare cores) turning maps into
                # files is spread over threads (OpenCV and zlib release the GIL), or the
                # model waits.
                list(self._pool().map(lambda job: self._finish(*job), jobs))
        return items

    def _checkpoint_jobs(self, decoded: list[DecodedStudy]) -> list[tuple]:
        """One pass of the checkpoint: every study's probabilities and its maps."""
        import torch

        context, engine, key = self.context, self.engine(), self.scorer.key
        batch = torch.from_numpy(np.stack([item.tensor(key) for item in decoded]))
        for item in decoded:
            item.tensors = None  # used: what travels back from a worker stays small
        batch = batch.to(context.device).contiguous(memory_format=torch.channels_last)
        stored = [self._stored(item) for item in decoded]
        wanted: list[list[int]] = []

        def choose(probabilities: np.ndarray) -> list[list[int]]:
            wanted.extend(self._wanted(probabilities, stored))
            return wanted

        result = engine(batch, choose)
        scored = self.scorer.score_from(result.probabilities)
        measured = self._faithfulness(batch, result.maps) if self.settings.faithfulness else {}
        jobs = []
        for row, item in enumerate(decoded):
            geometry = item.geometry[key]
            maps = {self.scorer.findings[f]: (result.maps.pop((row, f)), geometry,
                                              {"faithfulness": measured[(row, f)]} if (row, f) in measured else None)
                    for f in wanted[row]}
            jobs.append((item, stored[row] or scored[row], maps, engine.layer_name))
        return jobs

    def _faithfulness(self, batch, maps: dict[tuple[int, int], np.ndarray]) -> dict[tuple[int, int], dict]:
        """Each map's deletion and insertion scores with the checkpoint itself, on the input grid."""
        import torch

        from cxrtool.explain.faithfulness import faithfulness

        network = self.scorer.network

        def score_of(finding: int):
            def score(images: np.ndarray) -> np.ndarray:
                tensor = torch.from_numpy(images[:, None]).to(batch.device, batch.dtype)
                with torch.no_grad():
                    return torch.sigmoid(network(tensor)[:, finding].float()).cpu().numpy()
            return score

        inputs = batch.detach().float().cpu().numpy()[:, 0]
        return {(row, f): faithfulness(score_of(f), inputs[row], cam) for (row, f), cam in maps.items() if cam.max() > 0}

    def _bundle_jobs(self, decoded: list[DecodedStudy]) -> list[tuple]:
        """The bundle's scores, then each route member's maps of what is asked that it has."""
        import torch

        scored = self.scorer.score(decoded)
        stored = [self._stored(item) for item in decoded]
        asked: list[list[str]] = []
        for result, base in zip(scored, stored, strict=True):
            if self.fixed is not None:
                names = [self.scorer.findings[i] for i in self.fixed]
                asked.append([name for name in names if name in result.findings])
            elif base is not None:
                asked.append([self.scorer.findings[i] for i in self._positives(base) if self.scorer.findings[i] in result.findings])
            else:
                asked.append([name for name, p, t in zip(result.findings, result.probabilities, result.thresholds,
                                                          strict=True) if p >= t])
        sums: list[dict[str, np.ndarray]] = [{} for _ in decoded]
        peaks: list[dict[str, dict[str, float]]] = [{} for _ in decoded]
        layers: dict[str, str] = {}
        # None: it failed; a stored result keeps the route it was scored on (the views table of its predict run)
        routes = [(base or result).ensemble["route"] if (base or result).ensemble else None
                  for result, base in zip(scored, stored, strict=True)]
        for route in dict.fromkeys(r for r in routes if r is not None):
            rows = [i for i, r in enumerate(routes) if r == route]
            for member in self.bundle.members_of(route):
                scorer = self.scorer.members[member.name]
                mine = [[scorer.findings.index(name) for name in asked[i] if name in scorer.findings] for i in rows]
                if not any(mine):
                    continue
                engine = self.engine(member.name)
                layers[member.name] = engine.layer_name
                batch = torch.from_numpy(np.stack([decoded[i].tensor(scorer.key) for i in rows]))
                batch = batch.to(self.context.device).contiguous(memory_format=torch.channels_last)
                maps = engine(batch, mine).maps
                for k, i in enumerate(rows):
                    geometry = decoded[i].geometry[scorer.key]
                    for f in mine[k]:
                        cam = to_original(maps.pop((k, f)), geometry)
                        name, peak = scorer.findings[f], float(np.max(cam)) if cam.size else 0.0
                        peaks[i].setdefault(name, {})[member.name] = round(peak, 6)
                        scaled = cam / peak if peak > 0 else cam
                        sums[i][name] = scaled if name not in sums[i] else sums[i][name] + scaled
        jobs = []
        for i, item in enumerate(decoded):
            item.tensors = None  # used: what travels back from a worker stays small
            # each member's raw peak; the map averages their scaled maps
            maps = {name: (total / len(peaks[i][name]), None, {"members": peaks[i][name]}) for name, total in sums[i].items()}
            used = dict.fromkeys(member for by_member in peaks[i].values() for member in by_member)
            jobs.append((item, stored[i] or scored[i], maps, {member: layers[member] for member in used}))
        return jobs

    def _pool(self):
        from concurrent.futures import ThreadPoolExecutor

        if self._threads is None:
            self._threads = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="cxrtool-explain")
        return self._threads

    def __getstate__(self) -> dict[str, Any]:
        # Sent to worker processes (spawn/forkserver) without its engines or threads.
        return {**self.__dict__, "_engines": {}, "_threads": None}

    def _finish(self, item: DecodedStudy, scored, maps: dict[str, tuple], layer) -> None:
        """One study's result (``item.result``: its explanations, listing the files), maps,
        masks and overlays. ``scored``: the stored
        :class:`Result` the maps explain (predict's), or explain's own scores. ``maps``:
        finding -> (its map, the geometry that takes it from the input grid to the study's
        pixel grid or None when it is there already, and what else its record holds, or
        None: for a bundle each member's peak, with --faithfulness the map's scores)."""
        context = self.context
        path = context.paths[item.index]
        folder = context.folders[item.index]
        display, item.display = item.display, None  # keep what travels back to the main process small
        if isinstance(scored, Result):  # predict's result, its probabilities and settings kept; explain's stage added
            # (and the files its output stages listed, but those made from its old maps: they go with them)
            outputs = {stage: names for stage, names in scored.outputs.items() if stage not in MAP_OUTPUTS}
            result = replace(scored, settings={**scored.settings, "explain": context.settings["explain"]}, outputs=outputs)
        else:
            try:
                result = context.result(item, scored)
            except StudyFailure as failure:
                item.error = str(failure)
                return
        explained: dict[str, FindingMap] = {}
        chest = chest_mask(display) if maps and display is not None else NO_CHEST  # from the picture itself; once a study
        for name, (cam, geometry, extra) in maps.items():
            cam = to_original(cam, geometry) if geometry is not None else cam
            chest = chest.resized(cam.shape)  # once a study: its maps share the study's pixel grid
            try:
                entry = explained[name] = self._explain_one(path, folder, item, display, result.findings[name], name,
                                                            cam, chest)
            except OutputError as error:  # (in a worker: the run ends in the main process, naming it)
                item.error = item.fatal = str(error)
                return
            entry.faithfulness = (extra or {}).get("faithfulness")
            entry.members = (extra or {}).get("members")
        explanation = Explanation(
            method=self.settings.method,
            layer=layer,
            request=self.settings.request(),
            # whose calls the maps explain: the stored predict result's, or explain's own pass
            calls="predict" if isinstance(scored, Result) else "explain",
            findings=explained,
            note=None if explained else "no positive findings at the model's thresholds: nothing to explain",
        )
        item.geometry = None
        result.explanations = explanation
        item.result = result

    def _explain_one(self, path: Path, folder: Path, item: DecodedStudy, display: np.ndarray, call, finding: str,
                     cam: np.ndarray, chest: ChestMask) -> FindingMap:
        """One finding's regions and files from its map on the study's pixel grid, and
        whether the map lies on the chest (``trust``; ``chest`` is on the same grid)."""
        settings = self.settings
        spacing = tuple(item.pixel_spacing) if item.pixel_spacing else None
        entry = FindingMap(call.probability, call.positive)
        peak = float(np.max(cam)) if cam.size else 0.0
        regions = find_regions(cam, settings.threshold)
        if regions is None:
            entry.note = "no evidence: the map is zero everywhere, so no regions"
            return entry
        x, y = peak_point(cam)
        entry.map_max, entry.peak = round(peak, 6), [x, y]
        entry.trust = trust = judge_map(cam, chest, (x, y))
        if spacing:
            entry.peak_mm = [round(x * spacing[1], 2), round(y * spacing[0], 2)]
        entry.threshold = round(regions.level, 4)
        entry.regions = [region.record(spacing) for region in regions.regions]
        if trust.get("chest") != "none":
            for region, share in zip(entry.regions, region_chest_shares(regions.labels, chest), strict=True):
                region.chest_share = share
        if regions.dropped:
            entry.note = f"{regions.dropped} weakest regions beyond the first {len(regions.regions)} left out"
        stem = f"{output_stem(path.name)}.cxrtool.{self.context.model.id}.{file_slug(finding)}"
        files = entry.files
        scaled = cam / peak
        if settings.map_format == "npy":
            files["map"] = f"{stem}.map.npy"
            with atomic_write(folder / files["map"], "wb") as handle:
                np.save(handle, cam.astype(np.float32))
        else:
            files["map"] = f"{stem}.map.png"
            write_png(folder / files["map"], np.round(scaled * 65535.0).astype(np.uint16))
        files["mask"] = f"{stem}.mask.png"
        write_png(folder / files["mask"], regions.labels)
        ratio = display.shape[1] / cam.shape[1]
        small = cv2.resize(scaled, (display.shape[1], display.shape[0]), interpolation=cv2.INTER_AREA) if ratio < 1 else scaled
        caption = (f"{finding}  p={call.probability:.2f}  {'positive' if call.positive else 'negative'}  "
                   f"{CAM_METHOD_LABELS[settings.method]}")
        files["overlay"] = f"{stem}.overlay.png"
        boxes = [region.box for region in entry.regions]
        warning = f"not on the chest: {trust['reason']}" if trust.get("outside_chest") else None
        write_png(folder / files["overlay"], overlay(display, small, caption, boxes, ratio, warning=warning))
        return entry


def explain(
    inputs: Iterable[str | os.PathLike],
    *,
    model: str | os.PathLike,
    settings: ExplainSettings | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    batch_size: int = 16,
    workers: int | None = None,
    device: str = "auto",
    include_patient_id: bool = False,
    on_result: ResultCallback | None = None,
    progress: ProgressCallback | None = None,
    note: Callable[[str], None] | None = None,
    views: str | os.PathLike | None = None,
    outputs: Sequence[str | OutputKind] = (),
    stdin=None,
    cache: str | os.PathLike | None = None,
    engine: str | Engine = "local",
    ray_address: str | None = None,
) -> RunSummary:
    """Explain a checkpoint's calls on studies: maps, masks, boxes, overlays, contact sheets.

    Arguments are those of :func:`cxrtool.predict.predict` (``views`` routes a bundle's
    studies as predict's does; ``outputs`` adds output stages; ``dicomweb://`` inputs are
    fetched into ``cache``; ``engine`` and ``ray_address`` say where the work is done), plus
    ``settings``. A study
    whose sidecar already holds explanations of this model made from the same file content
    with the same settings is skipped unless ``overwrite`` (:func:`cxrtool.io.records.is_done`).

    Raises:
        ExplainUsageError: an unknown method, layer or finding (before any study is read).

    Example:
        >>> settings = ExplainSettings(method="gradcam", findings=("Effusion",))
        >>> summary = explain(["study/"], model="demo.safetensors", settings=settings)
    """
    from cxrtool.explain.cams import AttentionEngine, ExplainUsageError, OcclusionEngine, resolve_layer

    settings = settings or ExplainSettings()

    def check_model(scorer) -> None:
        # A wrong finding or layer is a usage error, not 400 failed studies: refused as
        # soon as the model is loaded, before any study is looked at.
        if settings.findings is not None:
            unknown = [name for name in settings.findings if name not in scorer.findings]
            if unknown:
                raise ExplainUsageError(f"the model has no finding {', '.join(map(repr, unknown))}; "
                                        f"its findings are: {', '.join(scorer.findings)}")
        bundle = scorer.bundle
        if bundle is not None and settings.faithfulness:
            raise ExplainUsageError("--faithfulness measures one network's maps with that network; a bundle's map averages "
                                    "its members': explain a member's checkpoint to measure it")
        if bundle is not None and settings.layer is not None:
            raise ExplainUsageError("--layer names one network's module; a bundle's members are each mapped at "
                                    "their own known layer: leave --layer out")
        networks = {name: member.network for name, member in scorer.members.items()} if bundle else {"": scorer.network}
        for name, network in networks.items():
            try:
                if settings.method == ATTENTION_METHOD:
                    AttentionEngine(network, settings.layer)  # refuses a head without attention, and --layer
                elif settings.method == OCCLUSION_METHOD:
                    OcclusionEngine(network, settings.layer)  # refuses --layer
                else:
                    resolve_layer(network, settings.layer, settings.method)
            except ExplainUsageError as error:
                raise ExplainUsageError(f"member {name!r}: {error}" if name else str(error)) from None

    options = RunOptions(out=out, overwrite=overwrite, batch_size=batch_size, workers=workers, device=device,
                         include_patient_id=include_patient_id, views=views, on_result=on_result, progress=progress,
                         note=note, stdin=stdin, cache=cache, engine=engine,
                         ray_address=ray_address)
    return run_studies(
        inputs, model=model, make_processor=lambda context: ExplainChunk(context, settings),
        settings={"predict": PREDICT_SETTINGS, "explain": settings.request()}, options=options,
        make_stages=lambda context: explain_stages(context, outputs), done_when={"explain": settings.request()},
        display_size=settings.display_size, check_model=check_model,
    )


class ContactSheets:
    """The output stage that writes ``cxrtool_explain.html`` in every folder the run wrote
    to, once, at the end (:func:`cxrtool.explain.render.contact_sheet`: from the sidecars,
    so it shows every model's maps of the folder's studies)."""

    def __init__(self) -> None:
        self.folders: set[Path] = set()

    def study(self, outcome: StudyOutcome) -> None:
        self.folders.add(outcome.folder)

    def finish(self) -> list[Path]:
        for folder in sorted(self.folders):
            if folder.is_dir():
                contact_sheet(folder)
        return sorted(self.folders)


def explain_stages(context: RunContext, outputs: Sequence[str | OutputKind] = ()) -> list[OutputStage]:
    """What ``explain`` writes: any ``outputs`` first (as ``predict``'s), the sidecars, the
    folder tables, then the contact sheets."""
    return [*extra_stages(context, outputs), *standard_stages(context.model, context.scorer, context.version),
            ContactSheets()]
