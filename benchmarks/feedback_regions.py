"""Look at the regions a feedback cycle of paper 4's loop measured, as a user would.

A contact sheet of training images as the model saw them (its 8-bit input square), each
with the region the cycle outlined (green box), the finding whose map made it, and the
film's own findings; the film's outer tenth (the border band, 36% of its area) is marked
by a dotted line. It also prints the share of the cycle's regions centred in that band.

    python benchmarks/feedback_regions.py runs/p4 --out docs/feedback_regions.jpg
    python benchmarks/feedback_regions.py runs/p4 --cycle 2 --count 24
    python benchmarks/feedback_regions.py runs/lse runs/linear --count 6   # one band of rows per run

Each ``RUN`` is the ``--out`` folder of a ``cxrtool train`` run with the ``radiomics`` loss
term (it holds ``config.yaml``, ``model.safetensors``, ``last_state.safetensors`` and the
cycles' cache ``feedback/``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN")
    parser.add_argument("--cycle", type=int, default=None, help="the cycle to show (default: the run's last)")
    parser.add_argument("--count", type=int, default=12, help="images on the sheet (default 12)")
    parser.add_argument("--columns", type=int, default=6)
    parser.add_argument("--tile", type=int, default=256, help="side of each picture in pixels")
    parser.add_argument("--seed", type=int, default=0, help="which images (a random draw of those with a region)")
    parser.add_argument("--out", type=Path, default=Path("feedback_regions.jpg"))
    args = parser.parse_args()

    import cv2

    import cxrtool  # noqa: F401  (torchvision prepared before timm and grad-cam)
    from cxrtool.io.outputs import atomic_write

    sheets = [sheet_of(run, args) for run in args.runs]
    width = max(sheet.shape[1] for sheet in sheets)
    sheet = np.vstack([np.pad(part, ((0, 0), (0, width - part.shape[1]), (0, 0))) for part in sheets])
    ok, encoded = cv2.imencode(".jpg", sheet, [cv2.IMWRITE_JPEG_QUALITY, 88])
    if not ok:
        sys.exit("could not encode the picture")
    with atomic_write(args.out, "wb") as handle:
        handle.write(encoded.tobytes())
    print(f"{args.out}: {len(args.runs)} run(s)")


def sheet_of(run: Path, args: argparse.Namespace) -> np.ndarray:
    """One run's rows of pictures, under a header line naming the run and its cycle."""
    import cv2

    from cxrtool.data.labels import read_unlabelled
    from cxrtool.models.checkpoint import load_tree, read_card
    from cxrtool.preprocess import Preprocessing
    from cxrtool.train.config import load_config
    from cxrtool.train.datasets import _load_square
    from cxrtool.train.feedback import FeedbackCache, regions_in_border_band
    from cxrtool.train.loop import training_table

    config = load_config(run / "config.yaml")
    card = read_card(run / "model.safetensors")
    saved = (load_tree(run / "last_state.safetensors").get("feedback") or {})
    if not saved:
        sys.exit(f"{run}: no feedback cycle in its training state (a run with the radiomics loss term?)")
    cache = FeedbackCache(run / "feedback")
    number = args.cycle or int(saved["number"])
    if number == int(saved["number"]):
        cycle = cache.load(number, str(saved["key"]))
    else:  # an earlier cycle: the one file of that number (a resumed run may have left others: the newest)
        files = sorted(cache.folder.glob(f"cycle{number:03d}-*.npz"), key=lambda p: p.stat().st_mtime)
        cycle = None
        if files:
            import json

            with np.load(files[-1], allow_pickle=False) as data:
                key = json.loads(str(data["meta"]))["key"]
            cycle = cache.load(number, key)
    if cycle is None:
        sys.exit(f"{run}: cycle {number} is not in {cache.folder}")

    table = training_table(config)
    paths = [table.resolve_image(i) for i in range(len(table))]
    if config.unlabelled:
        paths += read_unlabelled(config.unlabelled)[0]
    prep = Preprocessing.from_dict(card.preprocessing)
    side = cycle.side or prep.input_size
    band = regions_in_border_band(cycle.boxes[cycle.valid], side)
    print(f"cycle {number}: {int(cycle.valid.sum())} of {len(cycle.positions)} images with a region; "
          f"{'-' if band is None else f'{band:.0%}'} of the regions centred in the film's outer tenth (36% of its area)")

    rows = np.flatnonzero(cycle.valid)
    picked = np.sort(np.random.default_rng(args.seed).choice(rows, size=min(args.count, len(rows)), replace=False))
    tiles = []
    for k in picked:
        row = int(cycle.positions[k])
        square, _ = _load_square((str(paths[row]), prep))
        if square is None:
            continue
        scale = args.tile / square.shape[0]
        picture = cv2.cvtColor(cv2.resize(square, (args.tile, args.tile), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
        inset = round(0.1 * args.tile)
        for x in range(inset, args.tile - inset, 5):  # the border band's inner edge, dotted
            for y in (inset, args.tile - inset - 2):
                picture[y:y + 2, x:x + 2] = picture[x:x + 2, y:y + 2] = (0, 200, 255)
        top, left, bottom, right = (int(v) for v in cycle.boxes[k])
        cv2.rectangle(picture, (round(left * scale), round(top * scale)), (round(right * scale) - 1, round(bottom * scale) - 1),
                      (0, 255, 0), 2)
        present = ([card.findings[j] for j in np.flatnonzero(np.nan_to_num(table.targets[row]) > 0.5)]
                   if row < len(table) else None)
        film = "unlabelled" if present is None else (", ".join(present) or "no finding")
        for line, text in enumerate((f"region: {card.findings[int(cycle.findings[k])]}", f"film: {film}")):
            position = (4, 16 + 16 * line)
            cv2.putText(picture, text, position, cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(picture, text, position, cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(picture)
    if not tiles:
        sys.exit(f"{run}: no readable image with a region")
    columns = min(args.columns, len(tiles))
    blank = np.zeros_like(tiles[0])
    tiles += [blank] * (-len(tiles) % columns)
    rows_of = np.vstack([np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)])
    header = np.full((24, rows_of.shape[1], 3), 32, dtype=np.uint8)
    title = (f"{run.name if run.name != 'model' else run.parent.name}: cycle {number}, "
             f"{'-' if band is None else f'{band:.0%}'} of {int(cycle.valid.sum())} regions centred in the film's outer tenth")
    cv2.putText(header, title, (6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return np.vstack([header, rows_of])


if __name__ == "__main__":
    main()
