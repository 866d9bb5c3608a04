"""The persistent training image cache on real NIH radiographs: read once, then memory-mapped
by later constructions, runs and ranks; never a square of other bytes or another
preprocessing; failures remembered until the file changes; concurrent fillers agree."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cxrtool.train.cache as cache_module
from cxrtool.preprocess import Preprocessing
from cxrtool.train.cache import INDEX_NAME, DiskImageCache, cache_contents, read_square, shelf_name

PREP = Preprocessing(input_size=64)
runner = CliRunner()


@pytest.fixture(scope="module")
def nih_pngs(nih_dir: Path) -> list[Path]:
    return sorted((nih_dir / "images").glob("*.png"))[:24]


@pytest.fixture(scope="module")
def fresh_squares(nih_pngs: list[Path]) -> list[np.ndarray]:
    """Each image decoded without any cache: what the cache must give back."""
    return [read_square(path, PREP)[0] for path in nih_pngs]


def no_decoding(monkeypatch) -> None:
    """Any decode from here on fails the test."""
    def refuse(path, *args, **kwargs):
        raise AssertionError(f"decoded {path}, which the cache holds")

    monkeypatch.setattr(cache_module, "read_study", refuse)


def count_decoding(monkeypatch) -> list[str]:
    decoded: list[str] = []
    real = cache_module.read_study

    def counting(path, *args, **kwargs):
        decoded.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "read_study", counting)
    return decoded


def test_a_second_construction_reads_the_cache_and_decodes_nothing(nih_pngs, fresh_squares, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    first = DiskImageCache(nih_pngs[:8], PREP, folder, workers=0)
    assert (first.decoded, first.reused, first.failed) == (8, 0, {})

    no_decoding(monkeypatch)
    seen = []
    second = DiskImageCache(nih_pngs[:8], PREP, folder, workers=0, progress=lambda done, total: seen.append((done, total)))
    assert (second.decoded, second.reused, second.failed) == (0, 8, {})
    assert seen[-1] == (8, 8)
    for index in range(8):
        square = second.square(index)
        assert isinstance(square, np.memmap) and square.dtype == np.uint8
        np.testing.assert_array_equal(square, fresh_squares[index])
    [part] = cache_contents(folder)
    assert (part.squares, part.failures, part.folder.name) == (8, 0, shelf_name(PREP))
    assert part.made_with["preprocessing"] == PREP.to_dict()


def _uncompressed_png(path: Path, pixels: np.ndarray, mtime_ns: int) -> None:
    """A PNG whose size depends only on its shape (no compression), given modification time."""
    Image.fromarray(pixels).save(path, compress_level=0)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_file_rewritten_with_its_size_and_mtime_kept_is_decoded_again(nih_pngs, tmp_path, monkeypatch):
    """The quick check trusts an unchanged stat: a rewrite that puts size and mtime back still
    changes the ctime, so the file is hashed and its new content misses."""
    pixels = np.asarray(Image.open(nih_pngs[0]).convert("L"))
    study = tmp_path / "images" / "study.png"
    study.parent.mkdir()
    an_hour_ago = time.time_ns() - 3600 * 10**9  # old enough for its stat to be trusted and recorded
    _uncompressed_png(study, pixels, an_hour_ago)
    folder = tmp_path / "cache"
    before = DiskImageCache([study], PREP, folder, workers=0)
    index = json.loads((folder / INDEX_NAME).read_text())["files"]
    assert index[str(study.absolute())]["stat"]["mtime_ns"] == an_hour_ago  # the quick check will be asked

    changed = pixels.copy()
    changed[300:700, 300:700] = 255 - changed[300:700, 300:700]
    size = study.stat().st_size
    _uncompressed_png(study, changed, an_hour_ago)
    assert (study.stat().st_size, study.stat().st_mtime_ns) == (size, an_hour_ago)

    decoded = count_decoding(monkeypatch)
    after = DiskImageCache([study], PREP, folder, workers=0)
    assert decoded == [str(study)] and after.decoded == 1
    assert not np.array_equal(after.square(0), before.square(0))
    np.testing.assert_array_equal(after.square(0), read_square(study, PREP)[0])


def test_a_changed_preprocessing_is_never_served(nih_pngs, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    DiskImageCache(nih_pngs[:4], PREP, folder, workers=0)
    decoded = count_decoding(monkeypatch)
    for prep in (Preprocessing(input_size=48), Preprocessing(input_size=64, resize="squash"),
                 Preprocessing(input_size=64, resample="skimage", mean=0.5, std=1 / 2048)):
        decoded.clear()
        other = DiskImageCache(nih_pngs[:4], prep, folder, workers=0)
        assert other.decoded == 4 and len(decoded) == 4, prep
        assert other.square(0).shape == (prep.input_size, prep.input_size)
        np.testing.assert_array_equal(other.square(0), read_square(nih_pngs[0], prep)[0])
    monkeypatch.setattr(cache_module, "SQUARE_VERSION", cache_module.SQUARE_VERSION + 1)  # the reading code changed
    assert DiskImageCache(nih_pngs[:4], PREP, folder, workers=0).decoded == 4
    monkeypatch.undo()
    no_decoding(monkeypatch)
    assert DiskImageCache(nih_pngs[:4], PREP, folder, workers=0).reused == 4  # each kept apart, the first still there
    assert len(cache_contents(folder)) == 5


def test_an_unreadable_image_is_remembered_until_it_is_fixed(nih_pngs, tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    good = shutil.copy(nih_pngs[1], images / "good.png")
    broken = images / "broken.png"
    broken.write_bytes(nih_pngs[2].read_bytes()[:2000])  # a download cut short
    folder = tmp_path / "cache"

    first = DiskImageCache([good, broken], PREP, folder, workers=0)
    assert list(first.failed) == [1] and first.square(1) is None and first.square(0) is not None
    reason = first.failed[1]
    assert reason
    assert cache_contents(folder)[0].failures == 1

    with monkeypatch.context() as patched:
        no_decoding(patched)
        again = DiskImageCache([good, broken], PREP, folder, workers=0)
    assert again.failed == {1: reason} and again.decoded == 0

    shutil.copy(nih_pngs[2], broken)  # fixed
    decoded = count_decoding(monkeypatch)
    fixed = DiskImageCache([good, broken], PREP, folder, workers=0)
    assert fixed.failed == {} and decoded == [str(broken)]
    np.testing.assert_array_equal(fixed.square(1), read_square(nih_pngs[2], PREP)[0])


def _fill(paths: list[str], folder: str, start, share: tuple[int, int], barrier, results) -> None:
    """A process filling the cache: a run (share (0, 1)) or a rank."""
    start.wait()  # both at once
    cache = DiskImageCache(paths, PREP, folder, workers=0, share=share, wait=barrier.wait if barrier else None)
    results.put((share, cache.decoded, cache.reused))


def _run_two(paths: list[Path], folder: Path, shares: list[tuple[int, int]], ranks: bool) -> list[tuple[int, int]]:
    """(decoded, reused) of two processes filling the cache at once, by share."""
    context = multiprocessing.get_context("spawn")  # a clean interpreter each, as two runs or two ranks are
    start, barrier, results = context.Barrier(2), context.Barrier(2) if ranks else None, context.Queue()
    processes = [context.Process(target=_fill, args=([str(p) for p in paths], str(folder), start, share, barrier, results))
                 for share in shares]
    for process in processes:
        process.start()
    try:
        counts = sorted(results.get(timeout=90) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=30)
    assert [process.exitcode for process in processes] == [0, 0]
    return [(decoded, reused) for _, decoded, reused in counts]


def _assert_whole(paths, fresh, folder, monkeypatch) -> None:
    no_decoding(monkeypatch)
    cache = DiskImageCache(paths, PREP, folder, workers=0)
    assert (cache.reused, cache.failed) == (len(paths), {})
    for index, expected in enumerate(fresh):
        np.testing.assert_array_equal(cache.square(index), expected)
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]  # no temporary left behind
    index = json.loads((folder / INDEX_NAME).read_text())["files"]
    assert set(index) == {str(p.absolute()) for p in paths}  # each filler's fingerprints merged, none lost


def test_two_runs_filling_at_once_leave_a_whole_cache(nih_pngs, fresh_squares, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    counts = _run_two(nih_pngs, folder, [(0, 1), (0, 1)], ranks=False)
    assert all(decoded + reused == len(nih_pngs) for decoded, reused in counts)
    _assert_whole(nih_pngs, fresh_squares, folder, monkeypatch)


def test_two_ranks_each_decode_their_share(nih_pngs, fresh_squares, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    DiskImageCache(nih_pngs[:4], PREP, folder, workers=0)  # an earlier run's: no rank decodes these
    counts = _run_two(nih_pngs, folder, [(0, 2), (1, 2)], ranks=True)
    assert [decoded for decoded, _ in counts] == [10, 10], counts
    assert all(reused == len(nih_pngs) - 10 for _, reused in counts), counts
    _assert_whole(nih_pngs, fresh_squares, folder, monkeypatch)


@pytest.mark.slow
def test_train_reads_the_persistent_cache_on_its_second_run(nih_dir, nih_pngs, tmp_path, monkeypatch):
    from cxrtool.cli import app
    from cxrtool.train.config import load_config
    from cxrtool.train.loop import train

    labels = tmp_path / "labels.csv"
    rng = np.random.default_rng(0)
    with open(labels, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient_id", "Effusion", "Nodule"])
        for index, path in enumerate(nih_pngs[:16]):
            writer.writerow([path.name, f"p{index}", index % 2, int(rng.random() < 0.5)])
    folder = tmp_path / "cache"

    def run(out: str) -> tuple[list[str], list[dict]]:
        config = load_config(None, {"labels": str(labels), "images": str(nih_dir / "images"), "out": str(tmp_path / out),
                                    "architecture": "resnet18", "input_size": 32, "batch_size": 8, "epochs": 1,
                                    "workers": 0, "device": "cpu", "seed": 3, "image_cache": str(folder)})
        messages: list[str] = []
        result = train(config, progress=lambda event: messages.append(event.message) if event.kind == "message" else None)
        return messages, result.history

    messages, first = run("first")
    assert any(m.startswith("image cache: 0 of 16 images found there, 16 decoded now") for m in messages), messages
    no_decoding(monkeypatch)
    messages, second = run("second")
    assert any(m.startswith("image cache: 16 of 16 images found there, 0 decoded now") for m in messages), messages
    assert second[0]["train_loss"] == pytest.approx(first[0]["train_loss"], rel=1e-5)  # the same inputs

    result = runner.invoke(app, ["train", "--image-cache", str(folder), "--image-cache-info"])
    assert result.exit_code == 0 and "16 squares" in result.output, result.output
    result = runner.invoke(app, ["train", "--image-cache", str(folder), "--clear-image-cache"])
    assert result.exit_code == 0 and "emptied: 16 squares" in result.output, result.output
    assert cache_contents(folder) == [] and not (folder / INDEX_NAME).exists()


def test_the_setting_is_a_path_in_yaml_files_and_older_files_still_load(tmp_path):
    from cxrtool.train.config import load_config, write_config

    (tmp_path / "runs").mkdir()
    settings = tmp_path / "runs" / "train.yaml"
    settings.write_text("data:\n  labels: labels.csv\n  cache_images: false\nrun:\n  image_cache: ../squares\n")
    config = load_config(settings)
    assert config.image_cache == str(tmp_path / "squares") and config.cache_images is False
    written = write_config(config, tmp_path / "out" / "config.yaml")
    assert load_config(written).image_cache == str(tmp_path / "squares")
    assert load_config(None, {"labels": "x.csv", "image_cache": "memory"}).image_cache == "memory"
    for example in sorted(Path(__file__).resolve().parents[1].glob("examples/train_*.yaml")):
        assert load_config(example).image_cache == "auto", example
