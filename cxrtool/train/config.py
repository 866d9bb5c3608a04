"""Training configuration: defaults < YAML file < command-line overrides.

The resolved configuration is written beside the checkpoint as ``config.yaml`` so that a run
can be repeated exactly (``cxrtool train --config runs/x/config.yaml``), from any working
folder: paths in a YAML file (``labels``, ``images``, ``out``) are relative to the file's own
folder, and ``config.yaml`` is written that way; paths given on the command line are
relative to the working folder, as usual.

The heads' and loss terms' settings are flat keys here as everywhere (``lse_r``,
``focal_gamma``: YAML files, ``--set``, the ``config.yaml`` beside a checkpoint), but
each takes its default from the component's settings dataclass, where its help is
written too (:class:`cxrtool.models.heads.LSEHead.Settings`,
:class:`cxrtool.train.losses.FocalSettings`...; :mod:`cxrtool.components`); the
component reads its keys back through that dataclass.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from cxrtool.errors import brief
from cxrtool.io.yamlfile import read_yaml
from cxrtool.models.heads import DecoderHead, LabelGraphHead, LSEHead
from cxrtool.registry import (
    CAM_METHOD_LABELS,
    DEFAULT_ARCHITECTURE,
    DEFAULT_HEAD,
    DEFAULT_LOSS,
    HEADS,
    PADDINGS,
    PRESETS,
    SAMPLINGS,
    TASKS,
    THRESHOLD_METHODS,
    UNCERTAIN_POLICIES,
    VIEW_POSITIONS,
)
from cxrtool.train.cache import IMAGE_CACHE_MODES  # its words; any other value is the cache's folder (a path setting)
from cxrtool.train.losses import AsymmetricSettings, FocalSettings, LossSettings, PrototypeSettings, RadiomicsSettings, SupConSettings

# Settings that are paths: in a YAML file they are relative to the file's folder.
PATH_SETTINGS = ("labels", "images", "out", "init", "descriptions", "prompts", "unlabelled")


@dataclass
class TrainConfig:
    """Everything a training run depends on. Field names are the YAML keys and the
    ``--set key=value`` names."""

    # data
    task: str = "findings"  # registry.TASKS: findings, or view (a view classifier from the view column)
    labels: str = ""  # NIH Data_Entry CSV, CheXpert/MIMIC-style CSV, or generic CSV
    images: str = ""  # image root (default: beside the CSV)
    labels_format: str = "auto"  # auto | nih | chexpert | generic
    findings: list[str] = field(default_factory=list)  # default: the label file's own
    projections: list[str] = field(default_factory=list)  # train on these projections' rows only (a bundle's route)
    uncertain: str = "ignore"  # CheXpert -1 labels: ignore | positive | negative
    val_fraction: float = 0.15
    unlabelled: str = ""  # radiographs without labels (a folder, or a CSV with a path column): the radiomics term only
    # auto: each image decoded once into a persistent cache ($CXRTOOL_CACHE/train-images) that later
    # epochs, runs and torchrun's ranks memory-map (this run's memory if that folder cannot be
    # written); memory: this run's memory only; off: read and fit every image each time it is drawn;
    # or the persistent cache's folder (cxrtool.train.cache)
    image_cache: str = "auto"
    cache_images: bool = True  # false: the same as image_cache off (kept for older configuration files)
    # model
    init: str = ""  # start from this cxrtool checkpoint (its architecture and preprocessing too)
    architecture: str = DEFAULT_ARCHITECTURE
    head: str = DEFAULT_HEAD  # registry.HEADS
    # the heads' settings: help and default on each head's Settings (cxrtool.models.heads)
    lse_r: float = LSEHead.Settings.r
    head_dim: int = DecoderHead.Settings.dim  # also the label_features head's, and the apcl term's
    decoder_layers: int = DecoderHead.Settings.layers
    decoder_heads: int = DecoderHead.Settings.heads
    head_dropout: float = DecoderHead.Settings.dropout  # also the label_features head's
    decoder_self_attention: bool = DecoderHead.Settings.query_self_attention
    lga_text: bool = LabelGraphHead.Settings.text
    lga_layers: int = LabelGraphHead.Settings.graph_layers
    lga_cooccurrence_bias: float = LabelGraphHead.Settings.cooccurrence_bias
    descriptions: str = ""  # lga head and zero_shot: finding descriptions (YAML name -> text); default cxrtool's own
    zero_shot: bool = False  # dual branch (paper 3): a text-space projection, trained by the align loss term
    prompts: str = ""  # zero_shot: prompts file (YAML finding -> positive [and negative] descriptions)
    pretrained: bool = False  # ImageNet weights from the hub: needs the network
    input_size: int = 224
    drop_rate: float = 0.0
    output_stride: int = 32  # 16 or 8 dilate the last stage(s): finer feature maps and CAMs
    padding: str = "zeros"  # zeros, replicate or replicate_undilated: how the convolutions extend the image past its edge
    # optimisation
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3  # the backbone's learning rate (and the head's, unless head_lr is set)
    head_lr: float = 0.0  # the head's (and text branch's) learning rate; 0: lr
    weight_decay: float = 1e-4  # not on norms, biases and the heads' embeddings
    warmup_epochs: float = 1.0  # linear warm-up, then a cosine decay
    preset: str = ""  # a paper's recipe (registry.PRESETS): its head and loss, under the YAML file and flags
    loss: str = DEFAULT_LOSS  # a loss expression of registry.LOSSES terms: asl, asl+0.5*bce, ...
    sampling: str = "uniform"  # registry.SAMPLINGS: uniform, or class_aware (the long tail seen as often as the head)
    # the loss terms' settings: help and default on each term's settings (cxrtool.train.losses)
    logit_adjustment: float = LossSettings.logit_adjustment
    apcl_momentum: float = PrototypeSettings.momentum
    apcl_temperature: float = PrototypeSettings.temperature
    supcon_temperature: float = SupConSettings.temperature
    focal_gamma: float = FocalSettings.gamma
    focal_alpha: float = FocalSettings.alpha
    radiomics_temperature: float = RadiomicsSettings.temperature
    feedback_every: int = 1  # radiomics: a feedback cycle before every E-th epoch (the first after E epochs)
    feedback_fraction: float = 0.5  # radiomics: share of the training images each cycle re-measures, in turn
    feedback_cam: str = "gradcam"  # radiomics: the map method whose regions are measured (the paper's Grad-CAM)
    feedback_layer: str = ""  # radiomics: its target layer (default: the method's)
    asl_gamma_neg: float = AsymmetricSettings.gamma_neg
    asl_gamma_pos: float = AsymmetricSettings.gamma_pos
    asl_clip: float = AsymmetricSettings.clip
    augment: bool = True
    amp: bool = True  # mixed precision where it pays: a GPU, or a CPU with bf16 units (models.network.mixed_precision)
    # run
    seed: int = 0
    workers: int = 2  # worker processes (0: none, all in this process): the loaders, the image cache, feedback cycles
    device: str = "auto"
    out: str = "runs/cxrtool"
    name: str = ""  # model name on the card (default: the output folder's name)
    threshold_method: str = "f1"
    max_train_batches: int = 0  # cap batches per epoch (0 = all): smoke tests, quick looks

    def validate(self) -> None:
        """Refuse impossible values early, naming the key."""
        from cxrtool.train.losses import parse_loss

        terms = {name for _, name in parse_loss(self.loss)}  # its own message: the term that is wrong, and the choices
        checks = [
            (self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {brief(self.task)}"),
            (self.task != "view" or not self.findings,
             "findings cannot be chosen for task view: its classes are the projections the labels' view column has"),
            (self.task != "view" or not self.projections,
             "projections cannot be chosen for task view: a view classifier learns to tell them apart"),
            (all(p in VIEW_POSITIONS for p in self.projections),
             f"projections must be among {', '.join(VIEW_POSITIONS)}, got {brief(', '.join(self.projections), quote=False)}"),
            (self.head in HEADS, f"head must be one of {', '.join(HEADS)}, got {brief(self.head)}"),
            (not self.zero_shot or "align" in terms,
             "zero_shot trains its text branch through the align loss term: add it (e.g. loss: 1.5*asl+align, "
             "or --preset dual-branch)"),
            (self.sampling in SAMPLINGS, f"sampling must be one of {', '.join(SAMPLINGS)}, got {brief(self.sampling)}"),
            (self.logit_adjustment >= 0, f"logit_adjustment must be 0 or more, got {self.logit_adjustment}"),
            (self.output_stride in (8, 16, 32), f"output_stride must be 8, 16 or 32, got {self.output_stride}"),
            (self.padding in PADDINGS, f"padding must be one of {', '.join(PADDINGS)}, got {brief(self.padding)}"),
            (self.feedback_every >= 1, f"feedback_every must be at least 1, got {self.feedback_every}"),
            (0 < self.feedback_fraction <= 1, f"feedback_fraction must be in (0, 1], got {self.feedback_fraction}"),
            (self.feedback_cam in CAM_METHOD_LABELS,
             f"feedback_cam must be one of {', '.join(CAM_METHOD_LABELS)}, got {brief(self.feedback_cam)}"),
            (not self.unlabelled or "radiomics" in terms,
             "unlabelled images enter the radiomics contrast only: add the term (loss: focal+radiomics, or "
             "--preset radiomics-feedback)"),
            (self.focal_alpha <= 1, f"focal_alpha must be at most 1 (negative: off), got {self.focal_alpha}"),
            (self.threshold_method in THRESHOLD_METHODS,
             f"threshold_method must be one of {', '.join(THRESHOLD_METHODS)}, got {brief(self.threshold_method)}"),
            (self.uncertain in UNCERTAIN_POLICIES,
             f"uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, got {brief(self.uncertain)}"),
            (0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.head_lr >= 0, f"head_lr must be positive (or 0: the same as lr), got {self.head_lr}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be 0 or more, got {self.warmup_epochs}"),
            (self.input_size >= 32, f"input_size must be at least 32, got {self.input_size}"),
            (bool(self.labels), "labels is required: a label CSV (NIH, CheXpert or generic)"),
            (bool(self.image_cache.strip()), f"image_cache must be one of {', '.join(IMAGE_CACHE_MODES)}, or a folder"),
            (self.image_cache in IMAGE_CACHE_MODES or not Path(self.image_cache).expanduser().is_file(),
             f"image_cache {brief(self.image_cache)} is a file: name a folder for the image cache "
             f"(or one of {', '.join(IMAGE_CACHE_MODES)})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, kind: Any, raw: Any) -> Any:
    """Turn a YAML or ``key=value`` string into the field's type, or say why not."""
    if isinstance(raw, str):
        text = raw.strip()
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{name} expects true/false, got {brief(raw)}")
        if kind is int:
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"{name} expects an integer, got {brief(raw)}") from None
        if kind is float:
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"{name} expects a number, got {brief(raw)}") from None
        if kind == list[str]:
            return [part.strip() for part in text.split(",") if part.strip()]
        return text
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if kind == list[str]:
        if not isinstance(raw, list | tuple) or not all(isinstance(item, str | int | float) for item in raw):
            raise ValueError(f"{name} expects a list of names, got {brief(raw)}")
        return [str(item) for item in raw]
    if kind in (bool, int, float, str) and not isinstance(raw, kind):
        raise ValueError(f"{name} expects {kind.__name__}, got {brief(raw)}")
    return raw


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then overrides (None values are ignored).

    Relative paths in the YAML file are taken from the file's folder; relative paths in
    ``overrides`` from the working folder.

    Example:
        >>> cfg = load_config("train.yaml", {"epochs": 3, "loss": "focal"})

    Raises:
        ValueError: naming an unknown key or a value of the wrong type.
    """
    hints = get_type_hints(TrainConfig)
    known = {f.name for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    if path is not None:
        loaded = read_yaml(path, what="a training configuration")  # YamlFileError (a ValueError): "FILE: reason"
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings at the top level, not {brief(loaded)}")
        # Allow grouping keys under sections (data:, model:, ...) for readability.
        for key, value in loaded.items():
            if isinstance(value, dict) and key not in known:
                values.update(value)
            else:
                values[key] = value
        folder = Path(path).parent
        for key, value in values.items():
            if _is_path(key, value) and not Path(value).expanduser().is_absolute():
                values[key] = os.path.normpath(folder / value)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    unknown = sorted((key for key in values if key not in known), key=str)
    if unknown:
        raise ValueError(f"unknown setting {brief(unknown[0])}; known settings: {', '.join(sorted(known))}")
    preset = values.get("preset") or ""
    if not isinstance(preset, str):
        raise ValueError(f"preset expects str, got {brief(preset)}")
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {brief(preset)}; choose one of {', '.join(PRESETS)}")
        # A preset sits between the defaults and everything given: its settings fill only
        # what the file and the flags leave unset.
        values = {**PRESETS[preset], **values}
    config = TrainConfig(**{k: _coerce(k, hints[k], v) for k, v in values.items()})
    return config


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["epochs=3", "loss=focal"]`` -> ``{"epochs": "3", "loss": "focal"}``."""
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {pair!r}")
        result[key.strip().replace("-", "_")] = value
    return result


def write_config(config: TrainConfig, path: Path) -> Path:
    """Write the settings as YAML, paths relative to the file's folder (so that
    ``cxrtool train --config PATH`` repeats the run from any working folder)."""
    from cxrtool.io.outputs import atomic_write

    values = config.to_dict()
    for key, value in values.items():
        if _is_path(key, value):
            values[key] = relative_to(value, Path(path).parent)
    with atomic_write(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(values, handle, sort_keys=False)
    return path


def _is_path(key: str, value: Any) -> bool:
    """Whether a setting's value is a path (relative to a YAML file's folder when read from one)."""
    if not isinstance(value, str) or not value:
        return False
    return key in PATH_SETTINGS or (key == "image_cache" and value not in IMAGE_CACHE_MODES)


def relative_to(target: str | os.PathLike, folder: str | os.PathLike) -> str:
    """``target`` as a path relative to ``folder`` (absolute when on another drive)."""
    try:
        return os.path.relpath(Path(target).expanduser().absolute(), Path(folder).absolute())
    except ValueError:
        return str(Path(target).expanduser().absolute())


def absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """Settings with their paths made absolute: comparable across working folders."""
    return {k: (os.path.abspath(Path(v).expanduser()) if _is_path(k, v) else v) for k, v in values.items()}
