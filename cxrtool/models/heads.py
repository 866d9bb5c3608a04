"""Classification heads: what turns the backbone's features into one logit per finding.

Every head takes the backbone's spatial feature map (B, C, h, w) and its pooled vector
(B, C) and returns a :class:`ModelOutput`: the logits, which is all ``predict`` and the CAM
methods see, plus what a training loss may need (a pooled embedding, one feature vector per
finding, per-finding spatial attention). A head is one class, registered where it is
defined (``@register_head``, :mod:`cxrtool.components`) with its ``name``, a one-line
``description`` and its ``Settings``: a frozen dataclass whose fields are the
constructor's settings, each with its default, its help and the training configuration's
key it is read from (``lse_r`` for the LSE head's ``r``), the one place all three are
written (:class:`~cxrtool.train.config.TrainConfig` and the constructor take their
defaults from it). The settings go on the model card, the head's buffers (priors and the
like) in the checkpoint's weights, so :func:`cxrtool.models.build.build_model` rebuilds
any checkpoint from its card alone.

A head of your own, in a module of its own (import it before you build or train)::

    from dataclasses import dataclass

    import torch
    from cxrtool.components import ComponentSettings, setting
    from cxrtool.models.heads import Head, ModelOutput, build_head, register_head

    @register_head
    class ScaledLinearHead(Head):
        name = "scaled_linear"
        description = "the linear head, its logits times a fixed scale"
        gives = frozenset({"embedding"})

        @dataclass(frozen=True)
        class Settings(ComponentSettings):
            scale: float = setting(2.0, help="what the logits are multiplied by")

        def __init__(self, width, findings, scale: float = Settings.scale):
            super().__init__(width, findings)
            self.scale = float(scale)
            self.linear = torch.nn.Linear(self.width, len(self.findings))

        def settings(self):
            return {"scale": self.scale}

        def forward(self, feature_map, pooled):
            return ModelOutput(logits=self.scale * self.linear(pooled), embedding=pooled)

    head = build_head("scaled_linear", 512, ["Effusion"], {"scale": 3.0})
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrtool.components import ComponentSettings, NoSettings, Registry, setting
from cxrtool.models.text import ENCODER_DIM
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
    """Base class. Subclasses set ``name``, ``description`` and ``Settings`` (their
    constructor's keyword settings, :mod:`cxrtool.components`), take ``(width, findings,
    **settings)`` and return a :class:`ModelOutput` from ``forward``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""  # one line: `cxrtool models` lists it
    Settings: ClassVar[type[ComponentSettings]] = NoSettings
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
        """This head's constructor settings from a training configuration's values
        (``head_dim``...), through its ``Settings``."""
        return cls.Settings.from_config(config).kwargs()

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


# The registered heads. cxrtool.registry.HEADS, the torch-free copy of their names and
# descriptions that the command line reads, is checked against each registration (and a
# head it does not list is added to it).
_HEADS: Registry[type[Head]] = Registry("head", HEADS, "cxrtool.registry.HEADS")


def register_head(cls: type[Head]) -> type[Head]:
    """Class decorator: make a head buildable by its ``name``, with its ``description``
    and its ``Settings``.

    Raises:
        ValueError: a class that does not name or describe itself (its own ``name`` and
            ``description``, not inherited ones), settings that are not a frozen
            :class:`~cxrtool.components.ComponentSettings` dataclass, a constructor whose
            keyword settings are not the dataclass's fields with the same defaults, or a
            name another head took.
    """
    origin = f"{cls.__module__}.{cls.__qualname__}"
    for attribute in ("name", "description"):
        if not cls.__dict__.get(attribute):
            raise ValueError(f"head class {origin} must set its own {attribute}")
    _check_constructor(cls, origin)
    _HEADS.add(cls.name, cls.description, cls.Settings, cls, origin)
    return cls


def _check_constructor(cls: type[Head], origin: str) -> None:
    """The constructor takes (width, findings) and then exactly the Settings' constructor
    fields, with the same defaults (or a ``**settings`` for them)."""
    parameters = dict(inspect.signature(cls.__init__).parameters)
    for name in ("self", "width", "findings"):
        if parameters.pop(name, None) is None:
            raise ValueError(f"head class {origin}: the constructor must take (width, findings, ...)")
    catch_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = {name: p for name, p in parameters.items() if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
    declared = {item.name: item for item in fields(cls.Settings) if item.metadata.get("constructor", True)}
    for name, parameter in named.items():
        if name not in declared:
            raise ValueError(f"head class {origin}: the constructor takes {name!r}, which its Settings do not declare")
        if parameter.default is not inspect.Parameter.empty and parameter.default != declared[name].default:
            raise ValueError(f"head class {origin}: the constructor's default for {name!r} is {parameter.default!r}, its "
                             f"Settings' {declared[name].default!r}: write it once (``{name}=Settings.{name}``)")
    missing = [name for name in declared if name not in named]
    if missing and not catch_all:
        raise ValueError(f"head class {origin}: its Settings declare {', '.join(missing)}, which the constructor does not take")


def build_head(name: str, width: int, findings: Sequence[str], settings: Mapping[str, Any] | None = None) -> Head:
    """The head called ``name``, with its settings.

    Raises:
        ValueError: an unknown name (the known ones are listed) or settings it does not take.
    """
    if name not in _HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    try:
        return _HEADS[name](width, findings, **dict(settings or {}))
    except TypeError as error:
        raise ValueError(f"head {name!r}: {error}") from None


@register_head
class LinearHead(Head):
    """One logit per finding from the pooled vector: ``pooled @ weight.T + bias``.

    Its parameters keep ``nn.Linear``'s names (``head.weight``, ``head.bias``), so the
    checkpoints of every earlier cxrtool load unchanged.
    """

    name = "linear"
    description = "one logit per finding from the pooled feature vector (CheXNet-style)"
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
    description = "a score map per finding, log-sum-exp pooled (ChestX-ray14's): the logit comes from where the map is high"
    gives = frozenset({"embedding", "attention"})

    @dataclass(frozen=True)
    class Settings(ComponentSettings):
        r: float = setting(5.0, key="lse_r", help="sharpness of the log-sum-exp pooling (small: the average; large: the maximum)")

    def __init__(self, width: int, findings: Sequence[str], r: float = Settings.r) -> None:
        super().__init__(width, findings)
        if not r > 0:
            raise ValueError(f"the LSE pooling's r must be positive, got {r}")
        self.r = float(r)

    def settings(self) -> dict[str, Any]:
        return {"r": self.r}

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
    description = "per-finding queries cross-attend to the spatial features, one classifier each (paper 1's decoupling)"
    gives = frozenset({"embedding", "features", "attention"})
    embeddings = ("queries",)

    @dataclass(frozen=True)
    class Settings(ComponentSettings):
        dim: int = setting(256, key="head_dim", help="width of the per-finding features")
        layers: int = setting(2, key="decoder_layers", help="transformer decoder layers")
        heads: int = setting(4, key="decoder_heads", help="attention heads")
        dropout: float = setting(0.1, key="head_dropout", help="dropout in the decoder layers")
        query_self_attention: bool = setting(False, key="decoder_self_attention",
                                             help="let the finding queries attend to each other")

    def __init__(self, width: int, findings: Sequence[str], *, dim: int = Settings.dim, layers: int = Settings.layers,
                 heads: int = Settings.heads, dropout: float = Settings.dropout,
                 query_self_attention: bool = Settings.query_self_attention) -> None:
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
    description = "the decoder, its queries from attention among the findings' text embeddings biased by co-occurrence (paper 1)"
    gives = DecoderHead.gives | {"correlation"}

    @dataclass(frozen=True)
    class Settings(DecoderHead.Settings):
        text_dim: int = setting(ENCODER_DIM, help="width of the text prior (the sentence encoder's); 0: learned label embeddings")
        graph_layers: int = setting(1, key="lga_layers", help="label graph attention layers")
        cooccurrence_bias: float = setting(1.0, key="lga_cooccurrence_bias",
                                           help="weight of log P(j | i) on the label attention logits")
        # not a constructor setting: it decides text_dim (settings_from)
        text: bool = setting(True, key="lga_text", constructor=False,
                             help="text-embedding priors (needs cxrtool[text]; else learned embeddings)")

    def __init__(self, width: int, findings: Sequence[str], *, text_dim: int = Settings.text_dim,
                 graph_layers: int = Settings.graph_layers, cooccurrence_bias: float = Settings.cooccurrence_bias,
                 **decoder: Any) -> None:
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
        from cxrtool.models.text import encoder_installed

        chosen = cls.Settings.from_config(config)
        return {**chosen.kwargs(), "text_dim": ENCODER_DIM if chosen.text and encoder_installed() else 0}

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
    description = "a feature per finding by class-specific spatial attention, related by self-attention (paper 2)"
    gives = frozenset({"embedding", "features", "attention", "correlation"})
    embeddings = ("label_embed", "identity")

    @dataclass(frozen=True)
    class Settings(ComponentSettings):
        # head_dim and head_dropout are the decoder's keys too: one default for both heads
        dim: int = setting(DecoderHead.Settings.dim, key="head_dim", help="width of the per-finding features")
        temperature: float = setting(1.0, help="temperature of the spatial attention's softmax over positions")
        dropout: float = setting(DecoderHead.Settings.dropout, key="head_dropout",
                                 help="dropout on the correlations' messages between findings")

    def __init__(self, width: int, findings: Sequence[str], *, dim: int = Settings.dim,
                 temperature: float = Settings.temperature, dropout: float = Settings.dropout) -> None:
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


# cxrtool.registry.HEADS, which the command line reads without importing torch, lists
# exactly the heads registered above (each registration checked its description).
_HEADS.check_listed()


def head_classes() -> dict[str, type[Head]]:
    """Every registered head class by name, in the order they registered (a copy)."""
    return _HEADS.items()
