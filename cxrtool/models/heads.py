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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
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
    correlation: torch.Tensor | None = None  # (K, K): the head's global relations between findings
    projection: torch.Tensor | None = None  # (B, E): the image in the text encoder's space, unit length
    zero_shot_logits: torch.Tensor | None = None  # (B, K): each finding's positive against its negative prompt


class Head(nn.Module):
    """Base class. Subclasses set ``name`` (a key of ``registry.HEADS``), take
    ``(width, findings, **settings)`` and return a :class:`ModelOutput` from ``forward``."""

    name: ClassVar[str] = ""
    # The ModelOutput fields beyond the logits this head fills (loss terms check them).
    gives: ClassVar[frozenset[str]] = frozenset()
    # Parameters that are embeddings (label queries and the like): trained without weight decay.
    embeddings: ClassVar[tuple[str, ...]] = ()

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
        """This head's settings from a training configuration's values (``head_dim``...)."""
        return {}

    def forward(self, feature_map: torch.Tensor, pooled: torch.Tensor) -> ModelOutput:
        raise NotImplementedError

    def fit_priors(self, targets: np.ndarray, config: Mapping[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
        """Fill the head's prior buffers from the training labels (and whatever else it
        uses), once, before training; returns what to record on the card. Default: none."""
        return {}

    def inherit(self, state: Mapping[str, torch.Tensor], findings: Sequence[str]) -> list[str]:
        """Take a parent's weights (this head's own keys, without the ``head.`` prefix) for
        the findings both have; returns the findings taken. Used by ``train --init``."""
        raise ValueError(f"fine-tuning from a {self.name!r} head is not supported yet")

    def takes_weights_of(self, head: str, settings: Mapping[str, Any]) -> bool:
        """Whether :meth:`inherit` can take a parent head's weights: by default, a head of the
        same kind with the same settings."""
        return head == self.name and dict(settings) == self.settings()


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

    def takes_weights_of(self, head: str, settings: Mapping[str, Any]) -> bool:
        # The linear and LSE heads hold the same per-finding score (a row of weights and a
        # bias); LSE only pools it differently, so each starts from the other's rows.
        return head in ("linear", "lse")

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


@register_head
class LSEHead(LinearHead):
    """A score map per finding, pooled by log-sum-exp: where the logit comes from is a map.

    Each finding's linear score is taken at every position of the feature grid (a 1x1
    convolution with the linear head's weights), then pooled by
    ``LSE_r(s) = log(mean(exp(r * s))) / r`` (Wang et al., ChestX-ray14, CVPR 2017; Pinheiro
    and Collobert, 2015): r -> 0 is the average (the linear head), large r the maximum.
    Under average pooling the network may spread a finding's logit over the whole film, a
    constant offset on the film's edge included, and a class activation map then peaks
    wherever that offset is largest; under LSE the logit rises only where the score map
    does, so a negative film must keep every position low and the map's peak is the place
    that made the call. Its Grad-CAM at the last stage is that score map (less the bias).

    Gives ``attention``: each finding's pooling weights (softmax of ``r * s`` over the grid),
    so ``--cam attention`` shows where the pool looked.
    """

    name = "lse"
    gives = frozenset({"embedding", "attention"})

    def __init__(self, width: int, findings: Sequence[str], r: float = 5.0) -> None:
        super().__init__(width, findings)
        if not r > 0:
            raise ValueError(f"the LSE pooling's r must be positive, got {r}")
        self.r = float(r)

    def settings(self) -> dict[str, Any]:
        return {"r": self.r}

    @classmethod
    def settings_from(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"r": float(config.get("lse_r", 5.0))}

    def score_map(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w): each finding's score at each position."""
        return torch.einsum("bchw,kc->bkhw", feature_map.float(), self.weight.float()) + self.bias.float()[None, :, None, None]

    def forward(self, feature_map: torch.Tensor, pooled: torch.Tensor) -> ModelOutput:
        scores = self.score_map(feature_map).flatten(2)  # (B, K, hw)
        positions = scores.shape[-1]
        logits = (torch.logsumexp(self.r * scores, dim=-1) - math.log(positions)) / self.r
        attention = torch.softmax(self.r * scores, dim=-1).reshape(scores.shape[0], scores.shape[1], *feature_map.shape[-2:])
        return ModelOutput(logits=logits.to(feature_map.dtype), embedding=pooled, attention=attention)


def _rows_by_finding(target: torch.Tensor, source: torch.Tensor, findings: Sequence[str], parent: Sequence[str]) -> list[str]:
    """Copy ``source``'s rows (one per parent finding) into ``target``'s rows of the same findings."""
    taken = []
    with torch.no_grad():
        for row, finding in enumerate(findings):
            if finding in parent:
                target[row] = source[list(parent).index(finding)]
                taken.append(finding)
    return taken


def _inherit(head: Head, state: Mapping[str, torch.Tensor], findings: Sequence[str], *, per_finding: Sequence[str]) -> list[str]:
    """A parent head's weights: the shared ones whole, the per-finding ones (first dimension
    one row per finding) row by row for the findings both have."""
    shared = {k: v for k, v in state.items() if k.split(".")[0] not in per_finding}
    head.load_state_dict({**head.state_dict(), **shared}, strict=True)
    taken: list[str] = []
    for key in per_finding:
        taken = _rows_by_finding(getattr(head, key), state[key], head.findings, findings)
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
    embeddings = ("queries",)

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
        # Unit variance, as Query2Label's embedding: at 0.02 the image's tokens swamp the
        # queries and the findings' features start almost identical (mean cosine 0.96).
        self.queries = nn.Parameter(torch.randn(len(self.findings), dim))
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, dropout, query_self_attention) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.class_weight = nn.Parameter(torch.randn(len(self.findings), dim) * dim**-0.5)
        self.class_bias = nn.Parameter(torch.zeros(len(self.findings)))

    def settings(self) -> dict[str, Any]:
        return {"dim": self.dim, "layers": self.n_layers, "heads": self.n_heads, "dropout": self.dropout_rate,
                "query_self_attention": self.query_self_attention}

    @classmethod
    def settings_from(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"dim": int(config.get("head_dim", 256)), "layers": int(config.get("decoder_layers", 2)),
                "heads": int(config.get("decoder_heads", 4)), "dropout": float(config.get("head_dropout", 0.1)),
                "query_self_attention": bool(config.get("decoder_self_attention", False))}

    def label_queries(self, batch_size: int) -> torch.Tensor:
        """The queries the decoder starts from, (B, K, dim); label-graph heads refine them."""
        return self.queries[None].expand(batch_size, -1, -1)

    def forward(self, feature_map: torch.Tensor, pooled: torch.Tensor) -> ModelOutput:
        return self.decode(feature_map, pooled, self.label_queries(feature_map.shape[0]))

    def decode(self, feature_map: torch.Tensor, pooled: torch.Tensor, queries: torch.Tensor) -> ModelOutput:
        """The decoder layers from these queries (B, K, dim) over the feature map's tokens."""
        batch, _, height, width = feature_map.shape
        values = self.project(feature_map).flatten(2).transpose(1, 2)  # (B, hw, dim)
        keys = values + sine_positions(height, width, self.dim, device=values.device, dtype=values.dtype)
        weights = None
        for layer in self.layers:
            queries, weights = layer(queries, keys, values)
        features = self.norm(queries)
        logits = (features * self.class_weight).sum(-1) + self.class_bias
        attention = weights.reshape(batch, len(self.findings), height, width)
        return ModelOutput(logits=logits, embedding=pooled, features=features, attention=attention)

    def inherit(self, state: Mapping[str, torch.Tensor], findings: Sequence[str]) -> list[str]:
        return _inherit(self, state, findings, per_finding=("queries", "class_weight", "class_bias"))


class LabelGraphLayer(nn.Module):
    """Pre-norm multi-head attention among the findings' embeddings, with an additive bias on
    the attention logits (the co-occurrence prior), then a feed-forward block.

    Written out rather than ``nn.MultiheadAttention``, whose returned weights are the ones
    after dropout: the correlation it gives the loss terms is the attention itself (rows
    summing to 1), dropout acting only on how the values are mixed.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.qkv.weight)  # as nn.MultiheadAttention starts
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out.bias)
        self.attention_dropout = nn.Dropout(dropout)
        self.feed_forward = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.norm_ff = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, labels: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``labels`` (B, K, dim), ``bias`` (K, K) added to the logits: the refined labels and
        the attention among them averaged over the heads (B, K, K)."""
        batch, count, dim = labels.shape
        q, k, v = self.qkv(self.norm(labels)).view(batch, count, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q = q * (dim // self.heads) ** -0.5  # scaled before the product, as torch does (float16 stays in range)
        weights = (q @ k.transpose(-1, -2) + bias).softmax(dim=-1)  # (B, heads, K, K)
        attended = (self.attention_dropout(weights) @ v).transpose(1, 2).reshape(batch, count, dim)
        labels = labels + self.dropout(self.out(attended))
        return labels + self.dropout(self.feed_forward(self.norm_ff(labels))), weights.mean(dim=1)

    # lga checkpoints written before the attention was spelled out (cxrtool main until
    # December 2026) hold nn.MultiheadAttention's names for the same weights.
    _RENAMED = {"attention.in_proj_weight": "qkv.weight", "attention.in_proj_bias": "qkv.bias",
                "attention.out_proj.weight": "out.weight", "attention.out_proj.bias": "out.bias"}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in self._RENAMED.items():
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register_head
class LabelGraphHead(DecoderHead):
    """Paper 1's label graph attention (LGA) in front of its decoder.

    Each finding has an embedding: the sentence-encoder embedding of its name and
    description (``text_prior``, 384-d, projected to the decoder's width, plus a learned
    offset), or a learned one when the encoder is not installed (``text_dim=0``). Attention
    among these embeddings is biased by the co-occurrence prior: ``cooccurrence_bias *
    log(P(j | i) + 1e-3)`` is added to the logit of finding i attending to finding j, P
    counted on the training labels (ML-GCN's conditional probabilities, unthresholded), so
    a finding listens to the findings that come with it. The refined embeddings are the
    decoder's queries. Both priors are buffers, saved in the checkpoint: predicting needs
    neither the labels nor the language model. Gives the label attention as
    ``correlation`` (K, K).
    """

    name = "lga"
    gives = DecoderHead.gives | {"correlation"}

    def __init__(self, width: int, findings: Sequence[str], *, text_dim: int = 384, graph_layers: int = 1,
                 cooccurrence_bias: float = 1.0, **decoder: Any) -> None:
        super().__init__(width, findings, **decoder)
        if text_dim < 0 or graph_layers < 1:
            raise ValueError(f"text_dim must be >= 0 and graph_layers >= 1, got {text_dim} and {graph_layers}")
        count = len(self.findings)
        self.text_dim, self.graph_layers, self.cooccurrence_bias = int(text_dim), int(graph_layers), float(cooccurrence_bias)
        self.register_buffer("cooccurrence", torch.eye(count))
        if self.text_dim:
            self.register_buffer("text_prior", torch.zeros(count, self.text_dim))
            self.text_project = nn.Linear(self.text_dim, self.dim)
        self.graph = nn.ModuleList(LabelGraphLayer(self.dim, self.n_heads, self.dropout_rate) for _ in range(graph_layers))

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "text_dim": self.text_dim, "graph_layers": self.graph_layers,
                "cooccurrence_bias": self.cooccurrence_bias}

    @classmethod
    def settings_from(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        from cxrtool.models.text import ENCODER_DIM, encoder_installed

        use_text = bool(config.get("lga_text", True)) and encoder_installed()
        return {**super().settings_from(config), "text_dim": ENCODER_DIM if use_text else 0,
                "graph_layers": int(config.get("lga_layers", 1)),
                "cooccurrence_bias": float(config.get("lga_cooccurrence_bias", 1.0))}

    def fit_priors(self, targets: np.ndarray, config: Mapping[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
        from cxrtool.data.statistics import cooccurrence
        from cxrtool.models.text import ENCODER_NAME, TEXT_HINT, finding_embeddings

        conditional, positives = cooccurrence(targets)
        never = [f for f, n in zip(self.findings, positives, strict=True) if n == 0]
        if never:
            say(f"warning: {', '.join(never)} never positive in the training labels: no co-occurrence prior for "
                f"{'it' if len(never) == 1 else 'them'} (a row of zeros)")
        with torch.no_grad():
            self.cooccurrence.copy_(torch.from_numpy(conditional))
        record: dict[str, Any] = {"cooccurrence": "P(j | i) on the training labels", "never_positive": never}
        if self.text_dim:
            embeddings = finding_embeddings(self.findings, descriptions=config.get("descriptions") or None, say=say)
            if embeddings is None:
                raise ValueError(TEXT_HINT)
            with torch.no_grad():
                self.text_prior.copy_(torch.from_numpy(embeddings))
            record.update(text_encoder=ENCODER_NAME, descriptions=str(config.get("descriptions") or "cxrtool's own"))
        else:
            say(f"note: {TEXT_HINT}; the lga head learns its label embeddings from scratch")
            record.update(text_encoder=None)
        return record

    def label_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The findings' embeddings after the graph layers (K, dim), and the last layer's
        attention among them (K, K)."""
        labels = self.queries
        if self.text_dim:
            labels = labels + self.text_project(self.text_prior)
        bias = self.cooccurrence_bias * torch.log(self.cooccurrence + 1e-3)
        weights = None
        x = labels[None]
        for layer in self.graph:
            x, weights = layer(x, bias)
        return x[0], weights[0]

    def label_queries(self, batch_size: int) -> torch.Tensor:
        labels, _ = self.label_embeddings()
        return labels[None].expand(batch_size, -1, -1)

    def forward(self, feature_map: torch.Tensor, pooled: torch.Tensor) -> ModelOutput:
        labels, relations = self.label_embeddings()  # once a batch: the same for every image
        output = self.decode(feature_map, pooled, labels[None].expand(feature_map.shape[0], -1, -1))
        output.correlation = relations
        return output

    def inherit(self, state: Mapping[str, torch.Tensor], findings: Sequence[str]) -> list[str]:
        # The priors are this run's (fit_priors); the parent's learned layers and, by
        # finding, its queries and classifiers carry over.
        state = {k: v for k, v in state.items() if k not in ("cooccurrence", "text_prior")}
        own = self.state_dict()
        return super().inherit({**state, "cooccurrence": own["cooccurrence"],
                                **({"text_prior": own["text_prior"]} if self.text_dim else {})}, findings)


@register_head
class LabelFeatureHead(Head):
    """Paper 2's label-level features with global label correlations.

    The feature map is projected to ``dim`` channels and decomposed into one feature per
    finding by class-specific spatial attention (finding k's learned vector scores every
    position; a softmax over positions weighs them: ``f_k = sum a_k(p) x_p``). Global label
    correlations come from self-attention over learned label embeddings, ``G = softmax(q(L)
    k(L)^T / sqrt(dim))`` (K, K), and pass information between the findings' features
    (``f + G v(f)``, then layer norm); each finding is scored by its own classifier. Gives
    the label features, the spatial attention (B, K, h, w) and ``G`` as ``correlation``, for
    the label-correlation loss terms.
    """

    name = "label_features"
    gives = frozenset({"embedding", "features", "attention", "correlation"})
    embeddings = ("label_embed", "identity")

    def __init__(self, width: int, findings: Sequence[str], *, dim: int = 256, temperature: float = 1.0,
                 dropout: float = 0.1) -> None:
        super().__init__(width, findings)
        if dim < 1 or temperature <= 0:
            raise ValueError(f"dim must be positive and temperature > 0, got {dim} and {temperature}")
        count = len(self.findings)
        self.dim, self.temperature, self.dropout_rate = int(dim), float(temperature), float(dropout)
        self.project = nn.Conv2d(self.width, dim, kernel_size=1)
        self.spatial = nn.Parameter(torch.randn(count, dim) * dim**-0.5)
        self.label_embed = nn.Parameter(torch.randn(count, dim))
        # Each finding's own offset on its feature: the attention-pooled tokens alone start
        # as the same mean token for every finding (cosine 1.00 between them at initialisation)
        self.identity = nn.Parameter(torch.randn(count, dim))
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.class_weight = nn.Parameter(torch.randn(count, dim) * dim**-0.5)
        self.class_bias = nn.Parameter(torch.zeros(count))

    def settings(self) -> dict[str, Any]:
        return {"dim": self.dim, "temperature": self.temperature, "dropout": self.dropout_rate}

    @classmethod
    def settings_from(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"dim": int(config.get("head_dim", 256)), "dropout": float(config.get("head_dropout", 0.1))}

    def correlation(self) -> torch.Tensor:
        """The global label correlations (K, K), rows summing to 1."""
        scores = self.query(self.label_embed) @ self.key(self.label_embed).T / self.dim**0.5
        return scores.softmax(dim=-1)

    def forward(self, feature_map: torch.Tensor, pooled: torch.Tensor) -> ModelOutput:
        batch, _, height, width = feature_map.shape
        tokens = self.project(feature_map).flatten(2).transpose(1, 2)  # (B, hw, dim)
        attention = (torch.einsum("bnd,kd->bkn", tokens, self.spatial) / self.temperature).softmax(dim=-1)
        features = attention @ tokens + self.identity  # (B, K, dim)
        relations = self.correlation()
        features = self.norm(features + self.dropout(torch.einsum("kj,bjd->bkd", relations, self.value(features))))
        logits = (features * self.class_weight).sum(-1) + self.class_bias
        return ModelOutput(logits=logits, embedding=pooled, features=features,
                           attention=attention.reshape(batch, len(self.findings), height, width), correlation=relations)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # label_features checkpoints written before the findings' offsets (cxrtool main until
        # December 2026) had none: zero offsets give their outputs unchanged
        if prefix + "spatial" in state_dict and prefix + "identity" not in state_dict:
            state_dict[prefix + "identity"] = torch.zeros_like(self.identity)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def inherit(self, state: Mapping[str, torch.Tensor], findings: Sequence[str]) -> list[str]:
        if "identity" not in state:  # a parent from before the offsets: zero, as it loads
            state = {**state, "identity": torch.zeros(len(findings), self.dim)}
        return _inherit(self, state, findings, per_finding=("spatial", "label_embed", "identity", "class_weight", "class_bias"))


def head_classes() -> dict[str, type[Head]]:
    """Every registered head class by name (a copy)."""
    return dict(_HEAD_CLASSES)
