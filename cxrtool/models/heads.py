"""Classification heads: what turns the backbone's features into one logit per finding.

Every head takes the backbone's spatial feature map (B, C, h, w) and its pooled vector
(B, C) and returns a :class:`ModelOutput`: the logits, which is all ``predict`` and the CAM
methods see, plus what a training loss may need (a pooled embedding, one feature vector per
finding, per-finding spatial attention). A head is one registered class: its name in
``cxrtool.registry.HEADS``, its settings on the model card, its buffers (priors and the
like) in the checkpoint's weights, so :func:`cxrtool.models.build.build_model` rebuilds
any checkpoint from its card alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cxrtool.registry import HEADS


@dataclass
class ModelOutput:
    """What a network's training forward returns (``model(images, full=True)``)."""

    logits: torch.Tensor  # (B, K)
    embedding: torch.Tensor | None = None  # (B, D): the image's pooled embedding
    features: torch.Tensor | None = None  # (B, K, D): one feature vector per finding
    attention: torch.Tensor | None = None  # (B, K, h, w): where each finding's feature looked


class Head(nn.Module):
    """Base class. Subclasses set ``name`` (a key of ``registry.HEADS``), take
    ``(width, findings, **settings)`` and return a :class:`ModelOutput` from ``forward``."""

    name: ClassVar[str] = ""
    # The ModelOutput fields beyond the logits this head fills (loss terms check them).
    gives: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, width: int, findings: Sequence[str]) -> None:
        super().__init__()
        if not findings:
            raise ValueError("a head needs at least one finding")
        self.width = int(width)
        self.findings = tuple(findings)

    def settings(self) -> dict[str, Any]:
        """The constructor's keyword settings, for the model card."""
        return {}

    @classmethod
    def settings_from(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """This head's settings from a training configuration's values (``decoder_dim``...)."""
        return {}

    def forward(self, feature_map: torch.Tensor, pooled: torch.Tensor) -> ModelOutput:
        raise NotImplementedError

    def inherit(self, state: Mapping[str, torch.Tensor], findings: Sequence[str]) -> list[str]:
        """Take a parent's weights (this head's own keys, without the ``head.`` prefix) for
        the findings both have; returns the findings taken. Used by ``train --init``."""
        raise ValueError(f"fine-tuning from a {self.name!r} head is not supported yet")


_HEAD_CLASSES: dict[str, type[Head]] = {}


def register_head(cls: type[Head]) -> type[Head]:
    """Class decorator: make a head buildable by its name (which the registry must list)."""
    if cls.name not in HEADS:
        raise ValueError(f"head {cls.name!r} is not listed in cxrtool.registry.HEADS")
    _HEAD_CLASSES[cls.name] = cls
    return cls


def build_head(name: str, width: int, findings: Sequence[str], settings: Mapping[str, Any] | None = None) -> Head:
    """The head called ``name``, with its settings.

    Raises:
        ValueError: an unknown name (the known ones are listed) or settings it does not take.
    """
    if name not in _HEAD_CLASSES:
        raise ValueError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    try:
        return _HEAD_CLASSES[name](width, findings, **dict(settings or {}))
    except TypeError as error:
        raise ValueError(f"head {name!r}: {error}") from None


@register_head
class LinearHead(Head):
    """One logit per finding from the pooled vector: ``pooled @ weight.T + bias``.

    Its parameters keep ``nn.Linear``'s names (``head.weight``, ``head.bias``), so the
    checkpoints of every earlier cxrtool load unchanged.
    """

    name = "linear"
    gives = frozenset({"embedding"})

    def __init__(self, width: int, findings: Sequence[str]) -> None:
        super().__init__(width, findings)
        reference = nn.Linear(self.width, len(self.findings))  # nn.Linear's initialisation
        self.weight = reference.weight
        self.bias = reference.bias

    def forward(self, feature_map: torch.Tensor, pooled: torch.Tensor) -> ModelOutput:
        return ModelOutput(logits=F.linear(pooled, self.weight, self.bias), embedding=pooled)

    def inherit(self, state: Mapping[str, torch.Tensor], findings: Sequence[str]) -> list[str]:
        taken = []
        with torch.no_grad():
            for row, finding in enumerate(self.findings):
                if finding in findings:
                    source = list(findings).index(finding)
                    self.weight[row] = state["weight"][source]
                    self.bias[row] = state["bias"][source]
                    taken.append(finding)
        return taken


def _rows_by_finding(target: torch.Tensor, source: torch.Tensor, findings: Sequence[str], parent: Sequence[str]) -> list[str]:
    """Copy ``source``'s rows (one per parent finding) into ``target``'s rows of the same findings."""
    taken = []
    with torch.no_grad():
        for row, finding in enumerate(findings):
            if finding in parent:
                target[row] = source[list(parent).index(finding)]
                taken.append(finding)
    return taken


def sine_positions(height: int, width: int, dim: int, *, device=None, dtype=None) -> torch.Tensor:
    """The fixed 2D sine/cosine position code of a height x width grid, (height*width, dim)
    (as in DETR: half the channels encode the row, half the column)."""
    if dim % 4:
        raise ValueError(f"the decoder's dim must be a multiple of 4, got {dim}")
    quarter = dim // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys = torch.arange(height, device=device, dtype=torch.float32)[:, None] * frequencies  # (h, dim/4)
    xs = torch.arange(width, device=device, dtype=torch.float32)[:, None] * frequencies  # (w, dim/4)
    rows = torch.cat([ys.sin(), ys.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    cols = torch.cat([xs.sin(), xs.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([rows, cols], dim=2).reshape(height * width, dim).to(dtype or torch.float32)


class DecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer: (optional) self-attention among the queries,
    cross-attention from the queries to the image tokens, a feed-forward block."""

    def __init__(self, dim: int, heads: int, dropout: float, self_attention: bool) -> None:
        super().__init__()
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True) if self_attention else None
        self.norm_self = nn.LayerNorm(dim) if self_attention else None
        self.cross = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.norm_ff = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.self_attention is not None:
            q = self.norm_self(queries)
            queries = queries + self.dropout(self.self_attention(q, q, q, need_weights=False)[0])
        attended, weights = self.cross(self.norm_cross(queries), keys, values, need_weights=True, average_attn_weights=True)
        queries = queries + self.dropout(attended)
        queries = queries + self.dropout(self.feed_forward(self.norm_ff(queries)))
        return queries, weights  # weights: (B, K, tokens), averaged over heads


@register_head
class DecoderHead(Head):
    """Paper 1's label-aware decoupling, in the Query2Label / ML-Decoder style.

    One learned query per finding cross-attends to the backbone's spatial tokens (a 1x1
    projection of the feature map plus a fixed 2D sine position code), through ``layers``
    pre-norm decoder layers; each finding's resulting feature is scored by its own linear
    classifier (a group-wise head). By default the queries do not attend to each other
    (``query_self_attention=False``, as ML-Decoder), so a dominant finding cannot suppress a
    rare one. Gives per-finding features (B, K, dim) and the last layer's cross-attention
    (B, K, h, w), a localization map per finding.
    """

    name = "decoder"
    gives = frozenset({"embedding", "features", "attention"})

    def __init__(self, width: int, findings: Sequence[str], *, dim: int = 256, layers: int = 2, heads: int = 4,
                 dropout: float = 0.1, query_self_attention: bool = False) -> None:
        super().__init__(width, findings)
        if dim % heads or dim % 4:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads}) and of 4")
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        self.dim, self.n_layers, self.n_heads = int(dim), int(layers), int(heads)
        self.dropout_rate, self.query_self_attention = float(dropout), bool(query_self_attention)
        self.project = nn.Conv2d(self.width, dim, kernel_size=1)
        self.queries = nn.Parameter(torch.randn(len(self.findings), dim) * 0.02)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, dropout, query_self_attention) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.class_weight = nn.Parameter(torch.randn(len(self.findings), dim) * dim**-0.5)
        self.class_bias = nn.Parameter(torch.zeros(len(self.findings)))

    def settings(self) -> dict[str, Any]:
        return {"dim": self.dim, "layers": self.n_layers, "heads": self.n_heads, "dropout": self.dropout_rate,
                "query_self_attention": self.query_self_attention}

    @classmethod
    def settings_from(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"dim": int(config.get("decoder_dim", 256)), "layers": int(config.get("decoder_layers", 2)),
                "heads": int(config.get("decoder_heads", 4)), "dropout": float(config.get("decoder_dropout", 0.1)),
                "query_self_attention": bool(config.get("decoder_self_attention", False))}

    def label_queries(self, batch_size: int) -> torch.Tensor:
        """The queries the decoder starts from, (B, K, dim); label-graph heads refine them."""
        return self.queries[None].expand(batch_size, -1, -1)

    def forward(self, feature_map: torch.Tensor, pooled: torch.Tensor) -> ModelOutput:
        batch, _, height, width = feature_map.shape
        values = self.project(feature_map).flatten(2).transpose(1, 2)  # (B, hw, dim)
        keys = values + sine_positions(height, width, self.dim, device=values.device, dtype=values.dtype)
        queries = self.label_queries(batch)
        weights = None
        for layer in self.layers:
            queries, weights = layer(queries, keys, values)
        features = self.norm(queries)
        logits = (features * self.class_weight).sum(-1) + self.class_bias
        attention = weights.reshape(batch, len(self.findings), height, width)
        return ModelOutput(logits=logits, embedding=pooled, features=features, attention=attention)

    def inherit(self, state: Mapping[str, torch.Tensor], findings: Sequence[str]) -> list[str]:
        per_finding = ("queries", "class_weight", "class_bias")
        shared = {k: v for k, v in state.items() if k.split(".")[0] not in per_finding}
        self.load_state_dict({**self.state_dict(), **shared}, strict=True)
        taken = []
        for key in per_finding:
            taken = _rows_by_finding(getattr(self, key), state[key], self.findings, findings)
        return taken


def head_classes() -> dict[str, type[Head]]:
    """Every registered head class by name (a copy)."""
    return dict(_HEAD_CLASSES)
