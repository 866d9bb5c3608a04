"""Shared benchmark plumbing: run a command in a child process and sample the memory of its
whole process tree (the child plus its decoding workers) from /proc, as PSS so that pages
shared between forked workers are not counted twice."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cxrtool  # noqa: F401  (first: makes torchvision, which TorchXRayVision imports, importable)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        queue.extend(_children(current))
    return pids


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(
    cmd: list[str], *, env: dict | None = None, interval: float = 0.05, sample_memory: bool = True
) -> tuple[int, float, float, str]:
    """Run ``cmd``; return (exit code, wall seconds, peak tree PSS in MiB, output).

    Reading a process's PSS makes the kernel walk its page tables (about 9 ms for a process
    holding torch), so sampling costs a noticeable share of a 2-core machine, more so for a
    run with several worker processes: time with ``sample_memory=False`` (peak is then 0) and
    measure memory in a separate run.
    """
    started = time.perf_counter()
    process = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(_pss_kib(p) for p in _tree(process.pid)))
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        sampler.start()
    output, _ = process.communicate()
    done.set()
    if sample_memory:
        sampler.join()
    return process.returncode, time.perf_counter() - started, peak / 1024, output


def nih_images(data: Path, limit: int | None = None) -> list[Path]:
    """The shared NIH PNGs (the first ``limit``), or the script ends saying where it looked."""
    pngs = sorted((data / "nih" / "images").glob("*.png"))[:limit]
    if not pngs:
        sys.exit(f"no NIH images under {data / 'nih' / 'images'}; pass --data")
    return pngs


def collect_inputs(data: Path, limit: int | None) -> list[Path]:
    pngs = sorted((data / "nih" / "images").glob("*.png"))
    dicoms = sorted((data / "dicom").rglob("*.dcm"))
    inputs = pngs + dicoms
    if not inputs:
        sys.exit(f"no images found under {data}; pass --data")
    return inputs[:limit] if limit else inputs


def link_inputs(inputs: list[Path], folder: Path, copies: int) -> Path:
    """``copies`` distinct names per input (symlinks), so no skip or dedup applies."""
    folder.mkdir(parents=True, exist_ok=True)
    for copy in range(copies):
        for index, source in enumerate(inputs):
            (folder / f"c{copy:02d}_{index:04d}_{source.name}").symlink_to(source.resolve())
    return folder


def make_model(path: Path, arch: str, input_size: int) -> Path:
    import torch

    from cxrtool.models.checkpoint import ModelCard, save_checkpoint
    from cxrtool.models.network import CXRClassifier
    from cxrtool.preprocess import Preprocessing
    from cxrtool.registry import NIH_FINDINGS

    torch.manual_seed(0)
    model = CXRClassifier(arch, NIH_FINDINGS)
    card = ModelCard(arch, list(NIH_FINDINGS), Preprocessing(input_size=input_size).to_dict(), name=f"bench-{arch}")
    return save_checkpoint(path, model, card)


def make_xrv_model(folder: Path, name: str) -> tuple[Path, Path]:
    """An XRV-format file of random weights for ``name`` (made offline, as the tests make
    them), and its import: for timing, where the weights' values do not matter."""
    import torch
    import torchvision
    import torchxrayvision as xrv

    from cxrtool.models.sources.xrv import import_xrv

    file = folder / os.path.basename(xrv.models.model_urls[name]["weights_url"])
    torch.manual_seed(0)
    if name.startswith("resnet"):
        model = torchvision.models.resnet50(num_classes=18, weights=None)
        model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        torch.save(model.state_dict(), file)
    else:
        torch.save(xrv.models.DenseNet(num_classes=18), file)
    imported = import_xrv(name, folder / "xrv.safetensors", weights=file, say=lambda _: None)
    return imported.checkpoint, file


def best_of_alternating(commands: dict[str, list[str]], repeat: int, *, env: dict | None = None) -> dict[str, dict]:
    """Run each command ``repeat`` times, alternating, unobserved; keep each one's fastest.

    Each command prints a JSON line ``{"items": N, "seconds": S}`` last. Alternating and
    keeping the best run lets a burst of load on a shared machine hit every side alike.
    """
    import json

    best: dict[str, dict] = {}
    for attempt in range(repeat):
        for label, cmd in commands.items():
            code, _, _, output = run_measured(cmd, env=env, sample_memory=False)
            if code != 0:
                sys.exit(f"{label} failed:\n{output}")
            run = json.loads(output.strip().splitlines()[-1])
            rate = run["items"] / run["seconds"]
            print(f"  run {attempt + 1}/{repeat} {label:>10}: {run['items']} in {run['seconds']:6.1f} s = {rate:7.2f}/s",
                  file=sys.stderr, flush=True)
            if label not in best or rate > best[label]["per_s"]:
                best[label] = {"items": run["items"], "seconds": round(run["seconds"], 2), "per_s": round(rate, 2)}
    return best


def step_seconds(arch: str, size: int, stride: int, device: str, padding: str = "zeros", repeat: int = 3, *,
                 dtype=None, head: str = "linear") -> float:
    """Best time of one training step (forward, backward, SGD update) on a batch of 32 grey
    images, channels-last as training lays them out; under autocast in ``dtype`` when given
    (training's mixed precision), else in float32."""
    import torch

    from cxrtool.models.network import CXRClassifier

    model = CXRClassifier(arch, [f"f{i}" for i in range(8)], output_stride=stride, padding=padding, head=head)
    model = model.to(device, memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = torch.randn(32, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    for _ in range(repeat + 1):  # the first is a warm-up
        started = time.perf_counter()
        optimiser.zero_grad()
        with torch.autocast(torch.device(device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            output = model(batch)
        output.float().sum().backward()
        optimiser.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best
