"""How cxrtool's DICOM reading differs from TorchXRayVision's ``read_xray_dcm``, on the real
DICOMs of ../shared/data: the model inputs (in XRV's units, 2048 grey levels from -1024 to
1024) and the calibrated probabilities of an imported XRV model.

cxrtool applies the Modality LUT, then the VOI LUT or window, then inverts MONOCHROME1;
XRV's reader (``voi_lut=False``, its default) scales the stored values by Bits Stored.

    python benchmarks/xrv_dicom.py --model xrv-all.safetensors
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint imported with cxrtool models import xrv:NAME")
    parser.add_argument("--dicoms", type=Path, default=SHARED)
    args = parser.parse_args()

    import cxrtool  # noqa: F401  (torchvision prepared first)

    # isort: split
    import torch
    import torchvision
    import torchxrayvision as xrv

    from cxrtool.io.studies import StudyReadError, read_study
    from cxrtool.models.calibration import Calibration
    from cxrtool.models.checkpoint import load_checkpoint
    from cxrtool.preprocess import Preprocessing, prepare

    model, card = load_checkpoint(args.model)
    prep, calibrate = Preprocessing.from_dict(card.preprocessing), Calibration.from_card(card)
    if prep.resample != "skimage":
        raise SystemExit(f"{args.model} is not a TorchXRayVision import")
    transform = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(prep.input_size)])

    def probabilities(tensor: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return calibrate(torch.sigmoid(model(torch.from_numpy(np.asarray(tensor, np.float32))[None])).numpy())[0]

    rows = []
    for path in sorted(args.dicoms.rglob("*.dcm")):
        name = f"{path.parent.name}/{path.name}"
        try:
            ours, _ = prepare(read_study(path).pixels, prep)  # mean 0.5, std 1/2048: already in XRV's units
        except StudyReadError as error:
            print(f"{name:36s} cxrtool cannot read it: {error}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = transform(xrv.utils.read_xray_dcm(str(path))[None])
        except Exception as error:  # noqa: BLE001 - report whatever XRV's reader raises, and go on
            print(f"{name:36s} XRV cannot read it: {type(error).__name__}: {str(error).splitlines()[0][:90]}")
            continue
        inputs = float(np.abs(ours - theirs).mean())
        scores = float(np.abs(probabilities(ours) - probabilities(theirs)).max())
        rows.append((inputs, scores))
        print(f"{name:36s} mean |input difference| {inputs:7.1f} of 2048   max |probability difference| {scores:.3f}")
    if rows:
        inputs, scores = np.array(rows).T
        print(f"{len(rows)} files read by both: input difference median {np.median(inputs):.1f} (range {inputs.min():.1f}-"
              f"{inputs.max():.1f}); probability difference median {np.median(scores):.3f}, at most {scores.max():.3f}")


if __name__ == "__main__":
    main()
