"""``cxrtool explain``: where the evidence is, as overlays, maps, masks and boxes."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from cxrtool.cli._console import (
    DICOMWEB_INPUTS,
    AeTitle,
    DicomwebCache,
    EngineOption,
    RayAddress,
    StoreTo,
    Workers,
    dicom_outputs,
    fail,
    run_over_studies,
)
from cxrtool.cli.predict import ViewsOption
from cxrtool.registry import CAM_METHOD_LABELS, DEFAULT_CAM_METHOD, MAP_FORMATS


class BareCamCommand(TyperCommand):
    """``explain``'s command: a bare ``--cam`` (last, or before another option or an input)
    means the default method, as the usage line ``cxrtool explain study/ --cam`` writes it;
    ``--cam METHOD`` names one. A word after ``--cam`` that is neither a method nor a path
    is left for the method check to refuse with the choices."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, with_bare_cam(args))


def with_bare_cam(args: list[str]) -> list[str]:
    """The arguments with the default method put after each bare ``--cam``."""
    out = []
    for i, token in enumerate(args):
        out.append(token)
        if token != "--cam" or "--" in args[:i]:
            continue
        following = args[i + 1] if i + 1 < len(args) else None
        if following is None or following == "-" or (following.startswith("-") and following.lower() not in CAM_METHOD_LABELS):
            out.append(DEFAULT_CAM_METHOD)
        elif following.lower() not in CAM_METHOD_LABELS and _looks_like_input(following):
            out.append(DEFAULT_CAM_METHOD)
    return out


def _looks_like_input(token: str) -> bool:
    return "/" in token or "\\" in token or any(c in token for c in "*?[") or Path(token).exists() \
        or Path(token).suffix.lower() in {".dcm", ".dicom", ".png", ".jpg", ".jpeg"}


def explain(
    inputs: Annotated[list[str], typer.Argument(help=DICOMWEB_INPUTS)],
    *,
    model: Annotated[Path, typer.Option("--model", "-m", envvar="CXRTOOL_MODEL", help="A cxrtool checkpoint (.safetensors), or a bundle (.yaml): its members' maps averaged.")],
    cam: Annotated[str, typer.Option("--cam", help=f"Map method: {', '.join(CAM_METHOD_LABELS)}; a bare --cam is {DEFAULT_CAM_METHOD}.")] = DEFAULT_CAM_METHOD,
    finding: Annotated[list[str] | None, typer.Option(
        "--finding", "-f", help="Finding to map (repeatable; 'all' for every finding). Default: each study's positive calls.")] = None,
    layer: Annotated[str | None, typer.Option("--layer", help="Target layer's module name, or several joined by + (fused). Default: layercam fuses the backbone's two shallowest stages, the other methods read its last stage.")] = None,
    threshold: Annotated[str, typer.Option("--threshold", help="Regions: a fraction of the map's peak, or 'otsu'.")] = "0.5",
    map_format: Annotated[str, typer.Option("--map-format", help=f"Raw map as {' or '.join(MAP_FORMATS)}: png is 16-bit, divided by its peak; npy is float32.")] = MAP_FORMATS[0],
    overlay_size: Annotated[int, typer.Option("--overlay-size", min=64, help="Longest side of the overlay pictures, in pixels.")] = 512,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write into a mirror tree here instead of beside the inputs.")] = None,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Stream one JSON object per study to stdout.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Explain again studies already explained with these settings.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Studies per forward pass (on the CPU each worker takes up to 8).")] = 16,
    workers: Workers = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    include_patient_id: Annotated[bool, typer.Option("--include-patient-id", help="Copy the DICOM PatientID into the outputs (off by default).")] = False,
    views: ViewsOption = None,
    faithfulness: Annotated[bool, typer.Option("--faithfulness", help="Also measure each map's deletion/insertion curves with the model (34 forward passes a map) into the sidecar; evaluate --boxes reports them.")] = False,
    dicom: Annotated[str | None, typer.Option("--dicom", help="DICOM objects to write for each DICOM study, in its study "
                                              "(comma-separated): seg, a Segmentation of the maps' regions, a segment per "
                                              "finding (NAME.cxrtool.<model id>.seg.dcm); sr, a Structured Report of the "
                                              "findings with each region outlined (.sr.dcm). Needs highdicom. PNG and JPEG "
                                              "studies get none.")] = None,
    store_to: StoreTo = None,
    ae_title: AeTitle = "CXRTOOL",
    cache: DicomwebCache = None,
    engine: EngineOption = "local",
    ray_address: RayAddress = None,
) -> None:
    """Where the evidence is: class activation maps as overlays, maps, masks and boxes.

    Per study and finding: an overlay PNG, the raw map, a region mask and the regions' boxes
    in the JSON sidecar; per folder a contact sheet (cxrtool_explain.html).

    Exit status: 0 all studies done, 1 some failed (reasons on stderr and in the CSV's
    error column), 2 usage error (unknown method, finding or layer), 130 interrupted.
    """
    from cxrtool.errors import UsageError
    from cxrtool.explain import ExplainSettings
    from cxrtool.explain import explain as run_explain
    from cxrtool.models.checkpoint import CheckpointError
    from cxrtool.models.sources import identify

    findings: tuple[str, ...] | None = None
    if finding:
        if any(name.lower() == "all" for name in finding):
            try:
                findings = tuple(identify(model)[1])  # the checkpoint's or bundle's findings, in order
            except (CheckpointError, OSError) as error:
                fail(str(error))
        else:
            findings = tuple(dict.fromkeys(finding))
    outputs = dicom_outputs(dicom, maps=True, store_to=store_to, ae_title=ae_title)
    try:
        settings = ExplainSettings(method=cam.lower(), layer=layer, findings=findings, threshold=threshold,
                                   map_format=map_format.lower(), display_size=overlay_size,
                                   faithfulness=faithfulness)
    except UsageError as error:
        fail(str(error))
    run_over_studies(
        "explain",
        functools.partial(run_explain, inputs, model=model, settings=settings, out=out, overwrite=overwrite,
                          batch_size=batch_size, workers=workers, device=device, include_patient_id=include_patient_id,
                          views=views, outputs=outputs, cache=cache, engine=engine,
                          ray_address=ray_address),
        jsonl=jsonl, listed="cxrtool_explain.html", done_word="explained", overwrite=overwrite,
    )

