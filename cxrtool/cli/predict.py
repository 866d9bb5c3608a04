"""``cxrtool predict``: per-finding probabilities for studies, beside them or under --out."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

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
    one_of,
    run_over_studies,
)
from cxrtool.registry import RUNTIMES, TTA_MODES

# Options predict shares with explain and models calibrate (one definition each).
ViewsOption = Annotated[Path | None, typer.Option("--views", help="A label or metadata table (NIH Data_Entry, CheXpert/MIMIC "
                                                  "CSV, MIMIC-CXR metadata, or path,view) giving the projection of studies "
                                                  "whose files do not; a bundle routes by it.")]
TtaOption = Annotated[str, typer.Option("--tta", callback=one_of(tuple(TTA_MODES)),
                                        help="Test-time augmentation: none, light (3 copies: zoom in and out 10%), "
                                             "strong (7: and shifts of 5%); the copies' probabilities averaged.")]
TtaFlipOption = Annotated[bool, typer.Option("--tta-flip", help="Also score each copy mirrored left to right (it moves "
                                                                "the heart: only for models trained with flips).")]


def predict(
    inputs: Annotated[list[str], typer.Argument(help=DICOMWEB_INPUTS)],
    *,
    model: Annotated[Path, typer.Option("--model", "-m", envvar="CXRTOOL_MODEL", help="A cxrtool checkpoint (.safetensors), or a bundle of them (.yaml: routed by projection, ensembled).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write into a mirror tree here instead of beside the inputs.")] = None,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Stream one JSON object per study to stdout.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Predict again studies already done by this model.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Studies per forward pass (on the CPU each decoding worker scores up to 8 at a time).")] = 16,
    workers: Workers = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    include_patient_id: Annotated[bool, typer.Option("--include-patient-id", help="Copy the DICOM PatientID into the outputs (off by default).")] = False,
    runtime: Annotated[str, typer.Option("--runtime", callback=one_of(RUNTIMES), help="What runs the network: auto (ONNX Runtime on a CPU "
                                         "when installed, else PyTorch), torch or onnx.")] = "auto",
    views: ViewsOption = None,
    tta: TtaOption = "none",
    tta_flip: TtaFlipOption = False,
    zero_shot: Annotated[list[str] | None, typer.Option("--zero-shot", help="'Finding: what it looks like' (repeatable): "
                                                        "score a finding the model never trained on from this description "
                                                        "(a dual-branch model); marked zero-shot and uncalibrated.")] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="YAML: finding -> positive descriptions (and optionally "
                                                 "{positive: [...], negative: [...]}), scored zero-shot.")] = None,
    dicom: Annotated[str | None, typer.Option("--dicom", help="DICOM objects to write for each DICOM study, in its study "
                                              "(comma-separated): sr, a Structured Report of the findings "
                                              "(NAME.cxrtool.<model id>.sr.dcm, needs highdicom). PNG and JPEG studies get none.")] = None,
    store_to: StoreTo = None,
    ae_title: AeTitle = "CXRTOOL",
    cache: DicomwebCache = None,
    engine: EngineOption = "local",
    ray_address: RayAddress = None,
) -> None:
    """Write each study's finding probabilities as a JSON sidecar and a per-folder CSV.

    Exit status: 0 all studies done, 1 some failed (reasons on stderr and in the CSV's
    error column), 2 usage error, 130 interrupted (re-run to resume).
    """
    from cxrtool.models.text import prompt_from_text, read_prompts
    from cxrtool.predict import predict as run_predict
    from cxrtool.preprocess import TestTimeAugmentation

    unseen: dict = {}
    try:
        unseen.update(read_prompts(prompts) if prompts else {})
        for text in zero_shot or []:
            name, entry = prompt_from_text(text)
            if name in unseen:
                raise ValueError(f"--zero-shot {name!r} is given twice (or also in --prompts)")
            unseen[name] = entry
    except ValueError as error:
        fail(str(error))
    outputs = dicom_outputs(dicom, store_to=store_to, ae_title=ae_title)

    run_over_studies(
        "predict",
        functools.partial(run_predict, inputs, model=model, out=out, overwrite=overwrite, batch_size=batch_size,
                          workers=workers, device=device, include_patient_id=include_patient_id, runtime=runtime,
                          views=views, tta=TestTimeAugmentation(tta, tta_flip), zero_shot=unseen or None,
                          outputs=outputs, cache=cache, engine=engine, ray_address=ray_address),
        jsonl=jsonl, listed="cxrtool_predictions.csv", done_word="predicted", overwrite=overwrite,
    )
