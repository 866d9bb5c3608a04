"""Training losses: registered terms, combined with weights by a loss expression.

A loss expression names registered terms (``cxrtool.registry.LOSSES`` lists them) with
optional weights: ``asl``, ``0.5*bce+focal``, ``asl+0.2*apcl``. Each term receives the
network's whole :class:`~cxrtool.models.heads.ModelOutput` (logits, and per-finding
features or an embedding where the head gives them) and the batch (a dict: ``image``,
``targets``, ``index``, ``view``, and whatever a term asks the dataset for), so a term
that needs more than logits is one more class, not an edit of the loop.

A term registers where it is defined: ``@register_loss(name, description=...,
settings=...)`` on its builder, a function of the :class:`LossContext` and the term's
settings, a frozen dataclass (:mod:`cxrtool.components`) that is the one place each
setting's default, help and training-configuration key (``focal_gamma``...) are written;
:func:`build_loss` reads them from the configuration through it. A term of your own, in a
module of its own (import it before you build or train)::

    from dataclasses import dataclass

    from cxrtool.components import ComponentSettings, setting
    from cxrtool.train.losses import LossContext, LossTerm, build_loss, register_loss

    @dataclass(frozen=True)
    class LogitPenaltySettings(ComponentSettings):
        scale: float = setting(0.01, help="weight of the mean squared logit")

    class LogitPenalty(LossTerm):
        name = "logit_penalty"

        def __init__(self, scale: float = LogitPenaltySettings.scale):
            super().__init__()
            self.scale = scale

        def forward(self, output, batch):
            return self.scale * output.logits.float().pow(2).mean()

    @register_loss("logit_penalty", description="the mean squared logit: keeps logits small", settings=LogitPenaltySettings)
    def _logit_penalty(context: LossContext, settings: LogitPenaltySettings) -> LogitPenalty:
        return LogitPenalty(settings.scale)

    loss = build_loss("asl+0.5*logit_penalty", LossContext(findings=["Effusion"]))

The classification terms mask unknown labels (NaN targets: CheXpert's uncertain ones under
``--uncertain ignore``). Asymmetric loss follows Ridnik et al., "Asymmetric Loss For
Multi-Label Classification" (ICCV 2021): a stronger focusing on negatives plus probability
shifting, which suits the long tail of chest findings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrtool.components import ComponentSettings, NoSettings, Registry, register_settings, setting
from cxrtool.models.heads import DecoderHead, ModelOutput
from cxrtool.registry import LOSSES


class MaskedMultiLabelLoss(nn.Module):
    """Base class: subclasses give the element-wise loss; masking and averaging live here."""

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets)
        safe_targets = torch.where(known, targets, torch.zeros_like(targets))
        losses = self.elementwise(logits.float(), safe_targets.float()) * known
        return losses.sum() / known.sum().clamp(min=1)


class BCELoss(MaskedMultiLabelLoss):
    def __init__(self, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None, persistent=False)

    def elementwise(self, logits, targets):
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight, reduction="none")


@dataclass(frozen=True)
class FocalSettings(ComponentSettings):
    gamma: float = setting(2.0, key="focal_gamma", help="focusing: easy examples weighted down by (1 - p_t)^gamma")
    alpha: float = setting(-1.0, key="focal_alpha", help="weight of positives (negatives 1 - alpha); negative: unweighted")


class FocalLoss(MaskedMultiLabelLoss):
    """Lin et al. (2017): down-weights easy examples by (1 - p_t)^gamma; with ``alpha`` in
    [0, 1] positives are weighted by alpha and negatives by 1 - alpha (paper 4's code uses
    0.25); a negative ``alpha`` weights them alike."""

    def __init__(self, gamma: float = FocalSettings.gamma, alpha: float = FocalSettings.alpha):
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    def elementwise(self, logits, targets):
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)
        loss = (1 - p_t).pow(self.gamma) * bce
        if self.alpha >= 0:
            loss = (self.alpha * targets + (1 - self.alpha) * (1 - targets)) * loss
        return loss


@dataclass(frozen=True)
class AsymmetricSettings(ComponentSettings):
    gamma_neg: float = setting(4.0, key="asl_gamma_neg", help="focusing on the negatives")
    gamma_pos: float = setting(0.0, key="asl_gamma_pos", help="focusing on the positives")
    clip: float = setting(0.05, key="asl_clip", help="probability shift of the negatives: easier ones contribute nothing")


class AsymmetricLoss(MaskedMultiLabelLoss):
    """ASL: gamma_neg > gamma_pos focuses on hard negatives; ``clip`` shifts negative
    probabilities down so that very easy negatives contribute nothing."""

    def __init__(self, gamma_neg: float = AsymmetricSettings.gamma_neg, gamma_pos: float = AsymmetricSettings.gamma_pos,
                 clip: float = AsymmetricSettings.clip, eps: float = 1e-8):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def elementwise(self, logits, targets):
        p = torch.sigmoid(logits)
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        loss_pos = targets * torch.log(p.clamp(min=self.eps)) * (1 - p).pow(self.gamma_pos)
        loss_neg = (1 - targets) * torch.log((1 - p_neg).clamp(min=self.eps)) * p_neg.pow(self.gamma_neg)
        return -(loss_pos + loss_neg)


# ---- terms -------------------------------------------------------------------------------


@dataclass
class LossContext:
    """What a term may be built from: the training labels and the run's settings."""

    findings: Sequence[str]
    targets: np.ndarray | None = None  # (N, K) training targets, NaN unknown
    # the training configuration's values: each term reads its own through its settings
    # dataclass (register_loss), keys missing here at that dataclass's defaults
    settings: Mapping[str, Any] = field(default_factory=dict)
    say: Callable[[str], None] | None = None  # where warnings for the user go
    width: int = 0  # the backbone's pooled width (terms with projection heads of their own)


class LossTerm(nn.Module):
    """One term of a loss expression. ``needs`` names the :class:`ModelOutput` fields it
    uses beyond the logits, so a head that lacks them is refused before training starts."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    # Batch entries beyond image/targets/index/view the dataset must give (e.g. "image_2").
    batch_needs: ClassVar[frozenset[str]] = frozenset()
    # True for terms that set findings against each other: with one finding they add nothing.
    relates_findings: ClassVar[bool] = False

    def forward(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class LossTermSpec:
    """A registered loss term: its builder makes the term from the context and its settings."""

    name: str
    description: str
    settings: type[ComponentSettings]
    build: Callable[[LossContext, Any], LossTerm]


# The registered terms. cxrtool.registry.LOSSES, the torch-free copy of their names and
# descriptions that the command line reads, is checked against each registration (and a
# term it does not list is added to it).
_LOSS_TERMS: Registry[LossTermSpec] = Registry("loss term", LOSSES, "cxrtool.registry.LOSSES")

Builder = TypeVar("Builder", bound=Callable[..., LossTerm])


def register_loss(name: str, *, description: str, settings: type[ComponentSettings] = NoSettings) -> Callable[[Builder], Builder]:
    """Decorator on a builder ``(context: LossContext, settings) -> LossTerm``: the term a
    loss expression calls ``name``, with its one-line ``description``; the builder gets
    ``settings.from_config(context.settings)``.

    Raises:
        ValueError: no description, settings that are not a frozen
            :class:`~cxrtool.components.ComponentSettings` dataclass (or that give a shared
            configuration key another default), or a name another term took.
    """

    def decorate(build: Builder) -> Builder:
        spec = LossTermSpec(name, description, settings, build)
        _LOSS_TERMS.add(name, description, settings, spec, f"{build.__module__}.{build.__qualname__}")
        return build

    return decorate


def loss_terms() -> dict[str, LossTermSpec]:
    """Every registered loss term by name, in the order they registered (a copy)."""
    return _LOSS_TERMS.items()


@dataclass(frozen=True)
class LossSettings(ComponentSettings):
    """Settings of the loss expression as a whole rather than of one term."""

    logit_adjustment: float = setting(0.0, key="logit_adjustment",
                                      help="tau: classification terms see logits + tau * log-odds of each prevalence")


register_settings("the loss expression", LossSettings)


class ClassificationTerm(LossTerm):
    """A masked multi-label loss on the logits against ``batch["targets"]``.

    With an ``offset`` (logit adjustment, :func:`logit_adjustment`) the loss sees the
    logits plus each finding's offset; the model itself, and so predict, never does.
    """

    def __init__(self, name: str, loss: MaskedMultiLabelLoss) -> None:
        super().__init__()
        self.name = name
        self.loss = loss
        self.register_buffer("offset", None, persistent=False)

    def forward(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = output.logits.float()
        if self.offset is not None:
            logits = logits + self.offset.to(logits.device)
        return self.loss(logits, batch["targets"])


def logit_adjustment(targets: np.ndarray, tau: float) -> torch.Tensor:
    """Logit adjustment (Menon et al., ICLR 2021) for multi-label training: each finding's
    offset is ``tau`` times the log-odds of its training prevalence. Training on shifted
    logits leaves the model's own logits free of the prior, so a rare finding is not
    pushed down for being rare; ``tau`` 0 is plain training, 1 the full prior."""
    t = np.asarray(targets, dtype=np.float64)
    known = ~np.isnan(t)
    prevalence = np.nansum(t, axis=0) / np.maximum(known.sum(axis=0), 1)
    prevalence = np.clip(prevalence, 1e-4, 1 - 1e-4)
    return torch.as_tensor(tau * np.log(prevalence / (1 - prevalence)), dtype=torch.float32)


@register_loss("bce", description="binary cross-entropy")
def _bce(context: LossContext, settings: NoSettings) -> ClassificationTerm:
    return ClassificationTerm("bce", BCELoss())


@register_loss("weighted_bce", description="binary cross-entropy, positives weighted by negatives/positives per finding")
def _weighted_bce(context: LossContext, settings: NoSettings) -> ClassificationTerm:
    if context.targets is None:
        raise ValueError("weighted_bce needs the training targets to count positives")
    t = torch.as_tensor(context.targets, dtype=torch.float32)
    known = ~torch.isnan(t)
    positives = torch.nan_to_num(t, nan=0.0).sum(0)
    negatives = known.sum(0) - positives
    return ClassificationTerm("weighted_bce", BCELoss(pos_weight=(negatives / positives.clamp(min=1)).clamp(max=100.0)))


@register_loss("focal", description="focal loss (Lin et al., 2017)", settings=FocalSettings)
def _focal(context: LossContext, settings: FocalSettings) -> ClassificationTerm:
    return ClassificationTerm("focal", FocalLoss(settings.gamma, settings.alpha))


@register_loss("asl", description="asymmetric loss (Ridnik et al., 2021)", settings=AsymmetricSettings)
def _asl(context: LossContext, settings: AsymmetricSettings) -> ClassificationTerm:
    return ClassificationTerm("asl", AsymmetricLoss(settings.gamma_neg, settings.gamma_pos, settings.clip))


class PromptAlignment(LossTerm):
    """Paper 3's image-text alignment: each labelled (image, finding) pair pulls the image's
    text-space embedding towards the finding's positive prompt and from its negative one, or
    the other way round for a negative label. A two-way contrast per pair, on the logits
    zero-shot scoring uses (:class:`~cxrtool.models.network.TextBranch`)."""

    name = "align"
    needs = frozenset({"zero_shot_logits"})

    def __init__(self) -> None:
        super().__init__()
        self.loss = BCELoss()

    def forward(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(output.zero_shot_logits.float(), batch["targets"])


@register_loss("align", description="image-text alignment: the image against each finding's positive and negative prompt "
                                    "(paper 3's dual branch)")
def _align(context: LossContext, settings: NoSettings) -> PromptAlignment:
    return PromptAlignment()


# ---- per-finding feature terms (papers 1 and 2) ----------------------------------------


def _labels(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) bool each: the batch's known labels, and which of them are present."""
    targets = batch["targets"]
    known = ~torch.isnan(targets)
    return known, known & (torch.nan_to_num(targets, nan=0.0) > 0.5)


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A zero loss attached to the graph (a batch with nothing to contrast)."""
    return like.sum() * 0.0


def _all_reduce_(*tensors: torch.Tensor) -> None:
    """Sum across DDP ranks, when training under torchrun (running statistics stay equal)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for tensor in tensors:
            dist.all_reduce(tensor)


@dataclass(frozen=True)
class PrototypeSettings(ComponentSettings):
    # the head's key: the prototypes are as wide as its per-finding features
    dim: int = setting(DecoderHead.Settings.dim, key="head_dim", help="width of the head's per-finding features")
    momentum: float = setting(0.9, key="apcl_momentum", help="moving average of the prototypes")
    temperature: float = setting(0.1, key="apcl_temperature", help="temperature of the contrast over prototypes")


class PrototypeContrast(LossTerm):
    """APCL, paper 1's adaptive prototype contrastive loss, on the head's per-finding features.

    Two prototypes per finding: ``present``, the exponential moving average (``momentum``)
    of the normalised features z_ik of the images that have finding k, and ``absent``, the
    same over the images known not to have it (buffers: saved with the training state and
    beside the checkpoint's weights). A feature of a present finding is pulled to its
    present prototype and pushed from its absent one and from the other findings' present
    prototypes (a cross-entropy over ``z_ik . P / temperature``, InfoNCE over prototypes); a
    feature of an absent finding is pulled to the absent prototype and pushed from the
    present one. Without the absent side the term is minimised by features that carry
    nothing about the image (each finding's slot is already told apart by its own query):
    here such features cannot be near both of a finding's prototypes, so they score about
    log 2 per label where informative ones go towards 0.

    Adaptive weights, on both sides: rarer findings count more, ``(n_max / n_k) ** rarity``
    from the training labels, normalised to mean 1; and findings whose present prototype is
    close to another finding's count more, ``1 + similarity * max(0, max_j cos(P_k, P_j))``.
    The present and the absent labels each give a weighted mean; the term is their average,
    so the many absent labels do not drown the few present ones. A prototype enters the
    contrast once it has been seen; an unseen one starts from the first batch's mean. A
    batch without known labels gives a zero term.
    """

    name = "apcl"
    needs = frozenset({"features"})

    def __init__(self, findings: Sequence[str], dim: int, positives: np.ndarray | None, *,
                 momentum: float = PrototypeSettings.momentum, temperature: float = PrototypeSettings.temperature,
                 rarity: float = 0.5, similarity: float = 1.0) -> None:
        super().__init__()
        if not 0 <= momentum < 1 or temperature <= 0:
            raise ValueError(f"apcl: momentum must be in [0, 1) and temperature > 0, got {momentum} and {temperature}")
        count = len(findings)
        self.momentum, self.temperature, self.similarity = float(momentum), float(temperature), float(similarity)
        # row 0: present, row 1: absent
        self.register_buffer("prototypes", torch.zeros(2, count, dim))
        self.register_buffer("seen", torch.zeros(2, count, dtype=torch.bool))
        n = np.ones(count) if positives is None else np.asarray(positives, dtype=np.float64)
        weights = np.where(n > 0, (n.max() / np.maximum(n, 1)) ** rarity, 0.0)
        weights = weights / weights[weights > 0].mean() if (weights > 0).any() else np.ones(count)
        self.register_buffer("rarity_weights", torch.as_tensor(weights, dtype=torch.float32), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # training states written before the absent prototypes (cxrtool main until December
        # 2026) hold the present ones only: the absent side starts unseen
        old = state_dict.get(prefix + "prototypes")
        if old is not None and old.dim() == 2:
            state_dict[prefix + "prototypes"] = torch.stack([old, torch.zeros_like(old)])
            state_dict[prefix + "seen"] = torch.stack([state_dict[prefix + "seen"], torch.zeros_like(state_dict[prefix + "seen"])])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        features = F.normalize(output.features.float(), dim=-1)  # (B, K, D)
        known, present = _labels(batch)
        sides = torch.stack([present, known & ~present])  # (2, B, K)
        with torch.no_grad():
            sums = torch.einsum("sbk,bkd->skd", sides.float(), features.detach())
            counts = sides.sum(1).float()  # (2, K)
            _all_reduce_(sums, counts)
            means = F.normalize(sums / counts.clamp(min=1)[..., None], dim=-1)
            fresh = (counts > 0) & ~self.seen
            self.prototypes[fresh] = means[fresh]
            self.seen |= fresh
        total = self._contrast(features, sides) if sides.any() else _zero(features)
        with torch.no_grad():
            # The moving average, after the loss used the prototypes as they were; on every
            # rank, its own share of the batch labelled or not, so the ranks stay equal.
            update = (counts > 0) & ~fresh
            blended = self.momentum * self.prototypes + (1 - self.momentum) * means
            self.prototypes[update] = F.normalize(blended, dim=-1)[update]
        return total

    def _contrast(self, features: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
        present, absent = F.normalize(self.prototypes, dim=-1)
        count = present.shape[0]
        with torch.no_grad():
            similar = present @ present.T
            similar = similar.masked_fill(torch.eye(count, dtype=torch.bool, device=similar.device) | ~self.seen[0][None, :], -1.0)
            closeness = similar.max(dim=1).values.clamp(min=0) if count > 1 else torch.zeros(count, device=similar.device)
            finding_weights = self.rarity_weights.to(features.device) * (1 + self.similarity * closeness)
        parts = []
        # a present finding's feature: its present prototype (class k) against the absent
        # one (class K) and the other findings' present prototypes
        rows, findings = sides[0].nonzero(as_tuple=True)
        if len(rows):
            z = features[rows, findings]  # (N, D)
            logits = torch.cat([z @ present.T, (z * absent[findings]).sum(-1, keepdim=True)], dim=1) / self.temperature
            allowed = torch.cat([self.seen[0][None, :].expand(len(rows), -1), self.seen[1][findings][:, None]], dim=1)
            loss = F.cross_entropy(logits.masked_fill(~allowed, float("-inf")), findings, reduction="none")
            parts.append(self._weighted(loss, finding_weights[findings]))
        # an absent finding's feature: its absent prototype against its present one
        rows, findings = sides[1].nonzero(as_tuple=True)
        if len(rows):
            z = features[rows, findings]
            logits = torch.stack([(z * absent[findings]).sum(-1), (z * present[findings]).sum(-1)], dim=1) / self.temperature
            logits = logits.masked_fill(~torch.stack([self.seen[1][findings], self.seen[0][findings]], dim=1), float("-inf"))
            loss = F.cross_entropy(logits, torch.zeros_like(findings), reduction="none")
            parts.append(self._weighted(loss, finding_weights[findings]))
        return torch.stack(parts).mean() if parts else _zero(features)

    @staticmethod
    def _weighted(loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return (weights * loss).sum() / weights.sum().clamp(min=1e-8)


@register_loss("apcl", description="adaptive prototype contrastive loss on per-finding features (paper 1)",
               settings=PrototypeSettings)
def _apcl(context: LossContext, settings: PrototypeSettings) -> PrototypeContrast:
    positives = None if context.targets is None else np.nansum(np.asarray(context.targets, dtype=np.float64) > 0.5, axis=0)
    return PrototypeContrast(context.findings, settings.dim, positives, momentum=settings.momentum,
                             temperature=settings.temperature)


class CorrelationConsistency(LossTerm):
    """Paper 2's consistency of global and local label correlations.

    Local: within one image, the absolute cosine similarity between its label features
    (K, K). Two parts, added:

    - the local correlations are supervised by the image's labels, as the same group's
      GL-MLL does: two findings the image has should have aligned features, a finding it
      has and one it lacks (or two it lacks) unrelated ones; the squared difference from
      ``y y^T`` over the known pairs of different findings;
    - the global correlations (the head's ``correlation``, rows summing to 1) agree with
      the batch's mean local ones, each row normalised to sum to 1: the Kullback-Leibler
      divergence of the head's row from the images' row, averaged over the findings.

    The first version compared the two row-normalised matrices alone; at initialisation
    both are close to 1/K in every cell, so the term stayed near 1e-5 and changed nothing.
    """

    name = "lcc"
    needs = frozenset({"features", "correlation"})
    relates_findings = True

    def forward(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        features = F.normalize(output.features.float(), dim=-1)
        local = torch.einsum("bkd,bjd->bkj", features, features).abs()  # (B, K, K)
        known, _ = _labels(batch)
        y = torch.nan_to_num(batch["targets"]).float()
        count = local.shape[1]
        pairs = known[:, :, None] & known[:, None, :] & ~torch.eye(count, dtype=torch.bool, device=local.device)
        supervised = ((local - y[:, :, None] * y[:, None, :]).pow(2) * pairs).sum() / pairs.sum().clamp(min=1)
        images = local.mean(0)
        images = images / images.sum(-1, keepdim=True).clamp(min=1e-8)
        head = output.correlation.float().clamp(min=1e-8)
        agreement = (images * (images.clamp(min=1e-8).log() - head.log())).sum(-1).mean()
        return supervised + agreement


@register_loss("lcc", description="consistency of per-image and global label correlations (paper 2)")
def _lcc(context: LossContext, settings: NoSettings) -> CorrelationConsistency:
    return CorrelationConsistency()


@dataclass(frozen=True)
class SupConSettings(ComponentSettings):
    temperature: float = setting(0.1, key="supcon_temperature", help="temperature of the contrast")


class CorrelationSupCon(LossTerm):
    """Paper 2's label-correlation-guided multi-label supervised contrastive loss.

    How the paper's image-level positives are read here: on the label-level features, two
    images are a positive pair for finding k when both have k, so two images are pulled
    together through every finding they share, in proportion to the overlap of their label
    sets. Anchors are the features z_ik of each image's present findings. For an anchor the
    positives are finding k's features in the other images that have k; the negatives are
    (a) finding k's features in the images known not to have it, weight 1: without them
    features that carry nothing about the image minimise the term, since each finding's
    slot is already told apart by its own query; and (b) the other findings' features in
    the images that have them, each weighted by ``1 - C[k, k']``, C the symmetric
    co-occurrence of the training labels ((P(k'|k) + P(k|k'))/2): a finding that often
    comes with k is pushed away less. A supervised-contrastive term (Khosla et al.) per
    anchor with at least one positive, averaged; a batch without such anchors gives a zero
    term.
    """

    name = "lcsupcon"
    needs = frozenset({"features"})

    def __init__(self, findings: Sequence[str], targets: np.ndarray | None, *, temperature: float = SupConSettings.temperature) -> None:
        super().__init__()
        from cxrtool.data.statistics import cooccurrence

        count = len(findings)
        conditional = cooccurrence(targets)[0] if targets is not None else np.eye(count, dtype=np.float32)
        self.temperature = float(temperature)
        self.register_buffer("relatedness", torch.as_tensor((conditional + conditional.T) / 2), persistent=False)

    def forward(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        features = F.normalize(output.features.float(), dim=-1)
        known, present = _labels(batch)
        rows, findings = known.nonzero(as_tuple=True)
        present = present[rows, findings]  # (N,) each known label's value
        if int(present.sum()) < 2:
            return _zero(features)
        z = features[rows, findings]  # (N, D): every known label's feature
        similarity = z @ z.T / self.temperature
        same_finding = findings[:, None] == findings[None, :]
        other_image = rows[:, None] != rows[None, :]
        positives = same_finding & other_image & present[:, None] & present[None, :]
        absent_same = same_finding & ~present[None, :]  # the finding's features where it is absent
        other_present = ~same_finding & present[None, :]
        negatives = absent_same | other_present
        anchors = present & positives.any(dim=1)
        if not anchors.any():
            return _zero(features)
        weights = positives.float() + absent_same.float()
        weights = weights + torch.where(other_present, 1 - self.relatedness.to(z.device)[findings[:, None], findings[None, :]], 0.0)
        # log of (positives' sum + weighted negatives' sum), stable
        # (rows that are no anchor are left finite: an all -inf row would give NaN gradients)
        logits = similarity.masked_fill(~(positives | negatives) & anchors[:, None], float("-inf"))
        log_denominator = torch.logsumexp(logits + torch.log(weights.clamp(min=1e-12)), dim=1)
        log_probability = similarity - log_denominator[:, None]
        per_anchor = -(log_probability * positives).sum(1) / positives.sum(1).clamp(min=1)
        return per_anchor[anchors].mean()


@register_loss("lcsupcon", description="label-correlation-guided multi-label supervised contrastive loss (paper 2)",
               settings=SupConSettings)
def _lcsupcon(context: LossContext, settings: SupConSettings) -> CorrelationSupCon:
    return CorrelationSupCon(context.findings, context.targets, temperature=settings.temperature)


# ---- paper 4: the radiomics feedback loop --------------------------------------------


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR, Chen et al. 2020) between two views of N samples: each of the 2N
    vectors has its pair as the positive and the other 2N - 2 as negatives (cosine
    similarity over ``temperature``); the mean over the 2N."""
    count = a.shape[0]
    z = F.normalize(torch.cat([a, b]).float(), dim=-1)
    similarity = (z @ z.T / temperature).masked_fill(torch.eye(2 * count, dtype=torch.bool, device=z.device), float("-inf"))
    pair = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(z.device)
    return F.cross_entropy(similarity, pair)


@dataclass(frozen=True)
class RadiomicsSettings(ComponentSettings):
    temperature: float = setting(0.5, key="radiomics_temperature", help="NT-Xent temperature (paper 4)")


class RadiomicsContrast(LossTerm):
    """Paper 4's contrast between an image and its own region's radiomics.

    The image branch: the backbone's pooled embedding through a projection head. The
    radiomics branch: the region's standardised PyRadiomics features (F of them, set by
    each feedback cycle, :mod:`cxrtool.train.feedback`, looked up by the batch's table
    rows) through an MLP encoder (F-F-F, GELU), layer norm and a projection head. NT-Xent
    (:func:`nt_xent`, ``temperature`` 0.5 as the paper) between the two, over the images
    of the batch that have a region; a batch with fewer than two gives a zero term (so
    does every batch before the first cycle).

    Both branches live here, in the loss, not in the network: they train with it (the loop
    gives their parameters to the optimiser with the head's learning rate) and are kept
    with the training state, while predict, explain and the ONNX export see the ordinary
    network. An unlabelled image (all targets NaN) reaches this term only: the
    classification terms mask unknown labels.
    """

    name = "radiomics"
    needs = frozenset({"embedding"})
    feedback = True  # the training loop runs feedback cycles for a loss with this term

    def __init__(self, width: int, *, temperature: float = RadiomicsSettings.temperature, dim: int = 64) -> None:
        super().__init__()
        from cxrtool.train.feedback import feature_names

        if width < 1:
            raise ValueError("the radiomics term needs the backbone's width (LossContext.width)")
        if temperature <= 0:
            raise ValueError(f"radiomics: temperature must be positive, got {temperature}")
        count = len(feature_names())
        self.temperature = float(temperature)
        # as the paper's code: layer norm, then a projection head (hidden 32, out 64, GELU)
        self.image_projection = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 32), nn.GELU(), nn.Linear(32, dim))
        self.encoder = nn.Sequential(nn.Linear(count, count), nn.GELU(), nn.Linear(count, count))
        self.radiomics_projection = nn.Sequential(nn.LayerNorm(count), nn.Linear(count, 32), nn.GELU(), nn.Linear(32, dim))
        # the current cycle's standardised features by table row, and which rows have a region
        self.register_buffer("bank", torch.zeros(0, count), persistent=False)
        self.register_buffer("has_region", torch.zeros(0, dtype=torch.bool), persistent=False)

    def set_bank(self, rows: np.ndarray, features: np.ndarray, total: int) -> None:
        """Install a cycle's standardised features ``features`` (N, F) of table rows ``rows``
        (NaN rows: no region); ``total`` is the table's length."""
        features = np.asarray(features, dtype=np.float32)
        bank = torch.zeros(total, features.shape[1], device=self.bank.device)
        has = torch.zeros(total, dtype=torch.bool, device=self.bank.device)
        valid = ~np.isnan(features).any(axis=1)
        index = torch.as_tensor(np.asarray(rows)[valid], dtype=torch.long, device=self.bank.device)
        bank[index] = torch.as_tensor(features[valid], device=self.bank.device)
        has[index] = True
        self.bank, self.has_region = bank, has

    def forward(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        embedding = output.embedding.float()
        if self.bank.shape[0] == 0:
            return _zero(embedding)
        rows = torch.as_tensor(batch["index"], device=self.bank.device).long()
        keep = self.has_region[rows]
        if int(keep.sum()) < 2:
            return _zero(embedding)
        keep_here = keep.to(embedding.device)
        image = self.image_projection(embedding[keep_here])
        radiomics = self.radiomics_projection(self.encoder(self.bank[rows[keep]].to(embedding.device)))
        return nt_xent(image, radiomics, self.temperature)


@register_loss("radiomics", description="NT-Xent between the image and the radiomics of its own map's region, renewed by "
                                        "feedback cycles (paper 4)", settings=RadiomicsSettings)
def _radiomics(context: LossContext, settings: RadiomicsSettings) -> RadiomicsContrast:
    return RadiomicsContrast(context.width, temperature=settings.temperature)


# cxrtool.registry.LOSSES, which the command line reads without importing torch, lists
# exactly the terms registered above (each registration checked its description).
_LOSS_TERMS.check_listed()


# ---- expressions -------------------------------------------------------------------------

_TERM = re.compile(r"^\s*(?:(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*$")


def parse_loss(expression: str) -> list[tuple[float, str]]:
    """``"asl+0.2*apcl"`` -> ``[(1.0, "asl"), (0.2, "apcl")]``.

    Raises:
        ValueError: an expression that does not parse, an unknown term (the known ones are
            listed), a term named twice, or a weight that is not a positive finite number.
    """
    choices = ", ".join(LOSSES)
    if not expression or not expression.strip():
        raise ValueError(f"empty loss expression; name terms from {choices}, e.g. asl or asl+0.2*bce")
    terms: list[tuple[float, str]] = []
    for part in expression.split("+"):
        match = _TERM.match(part)
        if match is None:
            raise ValueError(f"cannot read the loss expression {expression!r} at {part.strip()!r}: "
                             f"write terms as NAME or WEIGHT*NAME joined by +, e.g. asl+0.2*bce")
        name = match["name"]
        if name not in _LOSS_TERMS:
            raise ValueError(f"unknown loss term {name!r} in {expression!r}; choose from {choices}")
        weight = float(match["weight"]) if match["weight"] is not None else 1.0
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"loss term {name!r} has weight {weight}; weights are positive numbers")
        if any(name == seen for _, seen in terms):
            raise ValueError(f"loss term {name!r} appears twice in {expression!r}")
        terms.append((weight, name))
    return terms


class CombinedLoss(nn.Module):
    """The weighted sum of a loss expression's terms; also returns each term's value, a
    detached tensor (read them back together with the loss, not one read-back a term)."""

    def __init__(self, terms: Sequence[tuple[float, LossTerm]]) -> None:
        super().__init__()
        self.weights = [float(weight) for weight, _ in terms]
        self.terms = nn.ModuleList([term for _, term in terms])

    @property
    def batch_needs(self) -> frozenset[str]:
        return frozenset().union(*(term.batch_needs for term in self.terms))

    def forward(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, parts = None, {}
        for weight, term in zip(self.weights, self.terms, strict=True):
            value = term(output, batch)
            parts[term.name] = value.detach()
            total = weight * value if total is None else total + weight * value
        return total, parts


def build_loss(expression: str, context: LossContext) -> CombinedLoss:
    """The loss an expression names, each term built from the context.

    Example:
        >>> loss = build_loss("asl+0.5*bce", LossContext(findings=["Effusion"]))
        >>> total, parts = loss(ModelOutput(logits=torch.zeros(2, 1)), {"targets": torch.ones(2, 1)})
    """
    specs = [(weight, _LOSS_TERMS[name]) for weight, name in parse_loss(expression)]
    loss = CombinedLoss([(weight, spec.build(context, spec.settings.from_config(context.settings))) for weight, spec in specs])
    tau = LossSettings.from_config(context.settings).logit_adjustment
    if tau:
        if context.targets is None:
            raise ValueError("logit_adjustment needs the training targets to know each finding's prevalence")
        offset = logit_adjustment(context.targets, tau)
        for term in loss.terms:
            if isinstance(term, ClassificationTerm):
                term.offset = offset
    relating = [term.name for term in loss.terms if term.relates_findings]
    if context.say is not None and relating and len(context.findings) == 1:
        classifying = any(isinstance(term, ClassificationTerm) for term in loss.terms)
        context.say(f"warning: one finding ({context.findings[0]}): {', '.join(relating)} set findings against each "
                    "other and have no other finding here; "
                    + ("the classification term does the training" if classifying
                       else "with no classification term in the loss the model learns next to nothing"))
    return loss


def check_head_gives(loss: CombinedLoss, head_name: str, gives: frozenset[str]) -> None:
    """Refuse a loss whose terms need outputs the head does not give.

    Raises:
        ValueError: naming the term and what it needs.
    """
    for term in loss.terms:
        missing = term.needs - gives
        if missing:
            hint = " (set zero_shot: true, or --preset dual-branch)" if "zero_shot_logits" in missing else ""
            raise ValueError(f"loss term {term.name!r} needs the head's {', '.join(sorted(missing))}, "
                             f"which the {head_name!r} head does not give{hint}")
