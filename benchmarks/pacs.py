"""Benchmark a PACS in the loop: studies per second through Orthanc (list, fetch, predict,
SR, store) against the same studies from local files (predict, SR), in the same run.

The studies are the real DICOMs in ../shared/data/dicom (17 radiographs: SIIM's JPEG
baseline and WG04's two images in 8 encodings each), each given UIDs of its own (the WG04
encodings share theirs) in a temporary copy, ``--copies`` times; the copies are uploaded to
a throw-away Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``, started here on free
localhost ports). Then, alternating, each side runs in a child process of its own, with a
fresh output folder (nothing is done before), and times its whole ``predict`` call:

- local: ``predict FOLDER --dicom sr --out OUT``;
- pacs:  ``predict dicomweb://.../studies/UID ... --dicom sr --store-to dicomweb://... --cache CACHE``
  (QIDO-RS per study, WADO-RS per instance in the decoding workers, STOW-RS per SR).

Prints studies/s for both (the best of ``--repeat`` runs each) and the ratio of their times
(the issue's target: the network path costs no more than 1.5x the local one).

    python benchmarks/pacs.py                 # resnet18 at 128 px on the CPU, 3 copies (51 studies)
    python benchmarks/pacs.py --copies 5 --repeat 3 --json pacs.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import cxrtool  # noqa: F401  (first: makes torchvision importable)

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _uid(*parts: str) -> str:
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(('cxrtool-bench-pacs', *parts))).int}"


def make_studies(data: Path, folder: Path, copies: int) -> list[tuple[Path, str]]:
    """Copies of the shared DICOMs, each its own study (new Study, Series and SOP Instance
    UIDs; pixels and transfer syntax as they are): (path, Study Instance UID)."""
    import pydicom

    sources = sorted((data / "dicom").rglob("*.dcm"))
    if not sources:
        sys.exit(f"no DICOM files in {data / 'dicom'}")
    folder.mkdir(parents=True)
    made = []
    for copy in range(copies):
        for source in sources:
            dataset = pydicom.dcmread(source)
            key = f"{source.relative_to(data)}#{copy}"
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID = _uid("study", key), _uid("series", key)
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = _uid("sop", key)
            path = folder / f"{source.stem}-{copy}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            made.append((path, str(dataset.StudyInstanceUID)))
    return made


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_orthanc(folder: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(binary).is_file() or not PLUGIN.is_file():
        sys.exit("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb")
    http_port = _free_port()
    config = {"Name": "cxrtool-bench", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "HttpPort": http_port, "DicomPort": _free_port(), "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (folder / "orthanc.json").write_text(json.dumps(config))
    process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/system", timeout=5).read()
            return process, http_port
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit("Orthanc did not start")
            time.sleep(0.2)


def child(args: argparse.Namespace) -> None:
    """One timed side, in a process of its own: prints {"studies", "seconds", "failed", "problems"}."""
    from cxrtool.predict import predict

    outputs: list = ["sr"]
    if args.mode == "pacs":
        from cxrtool.reports.store import store_to

        outputs.append(store_to(args.store_to))
        inputs = [line for line in args.inputs.read_text().splitlines() if line]
        started = time.perf_counter()
        summary = predict(inputs, model=args.model, outputs=outputs, cache=args.out, workers=args.workers,
                          batch_size=args.batch_size, device=args.device)
    else:
        started = time.perf_counter()
        summary = predict([args.inputs], model=args.model, outputs=outputs, out=args.out, workers=args.workers,
                          batch_size=args.batch_size, device=args.device)
    seconds = time.perf_counter() - started
    print(json.dumps({"studies": summary.predicted, "seconds": seconds, "failed": summary.failed,
                      "problems": summary.problems}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--copies", type=int, default=3, help="each DICOM this many times, as studies of their own")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each side, alternating; the best counts")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint (default: a random one of --arch)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    # child-process mode
    parser.add_argument("--mode", choices=["local", "pacs"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--store-to", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return

    from _measure import make_model, run_measured  # benchmarks/ is the script's own folder

    with tempfile.TemporaryDirectory(prefix="cxrtool-bench-pacs-") as tmp:
        tmp_path = Path(tmp)
        model = args.model or make_model(tmp_path / "model.safetensors", args.arch, args.input_size)
        studies = make_studies(args.data, tmp_path / "studies", args.copies)
        (tmp_path / "orthanc").mkdir()
        orthanc, port = start_orthanc(tmp_path / "orthanc")
        try:
            for path, _ in studies:  # Orthanc's REST API: POST /instances
                urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/instances", data=path.read_bytes()),
                                       timeout=60).read()
            service = f"dicomweb://127.0.0.1:{port}/dicom-web"
            urls = tmp_path / "urls.txt"
            urls.write_text("".join(f"{service}/studies/{study}\n" for _, study in studies))
            serial = 0
            best: dict[str, dict] = {}
            for repeat in range(args.repeat):
                for mode in ("local", "pacs"):
                    serial += 1
                    cmd = [sys.executable, __file__, "--mode", mode, "--model", str(model), "--out",
                           str(tmp_path / f"out{serial}"), "--device", args.device, "--batch-size", str(args.batch_size),
                           "--inputs", str(urls if mode == "pacs" else tmp_path / "studies"), "--store-to", service]
                    if args.workers is not None:
                        cmd += ["--workers", str(args.workers)]
                    code, _, _, output = run_measured(cmd, env={"CXRTOOL_NO_PROGRESS": "1"}, sample_memory=False)
                    if code != 0:
                        sys.exit(f"{mode} failed:\n{output}")
                    run = json.loads(output.strip().splitlines()[-1])
                    if run["failed"] or run["problems"] or run["studies"] != len(studies):
                        sys.exit(f"{mode}: not every study went through: {run}")
                    rate = run["studies"] / run["seconds"]
                    print(f"  run {repeat + 1}/{args.repeat} {mode:>5}: {run['studies']} studies in {run['seconds']:6.2f} s "
                          f"= {rate:6.2f} studies/s", file=sys.stderr, flush=True)
                    if mode not in best or rate > best[mode]["studies_per_s"]:
                        best[mode] = {"studies": run["studies"], "seconds": round(run["seconds"], 2),
                                      "studies_per_s": round(rate, 2)}
            on_server = len(json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/instances", timeout=30).read()))
        finally:
            orthanc.terminate()
            orthanc.wait(timeout=30)

    ratio = best["local"]["studies_per_s"] / best["pacs"]["studies_per_s"]
    for mode, label in (("local", "local files (predict, SR)"), ("pacs", "Orthanc (QIDO, WADO, predict, SR, STOW)")):
        row = best[mode]
        print(f"{label:>42}: {row['studies']} studies in {row['seconds']:6.2f} s = {row['studies_per_s']:6.2f} studies/s")
    print(f"the network path costs {ratio:.2f}x the local one (target <= 1.5x), best of {args.repeat} alternating runs "
          f"each ({args.arch} at {args.input_size} px, {args.device}, {os.cpu_count()} CPUs); "
          f"{on_server} instances on the server at the end (studies and the SRs stored)")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "input_size": args.input_size, "device": args.device,
                                         "cpus": os.cpu_count(), "studies": len(studies), "repeats": args.repeat,
                                         "runs": best, "pacs_cost_vs_local": round(ratio, 2)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
