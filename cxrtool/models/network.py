"""The classifier: any timm backbone on grey input, with a registered multi-label head.

The backbone is kept separate from the head so that heads can use the spatial feature map
(per-finding decoders, attention over findings), and so that the CAM target layer has a
stable name: ``backbone.<layer from the registry>``. ``model(images)`` returns logits for
every head, which is all ``predict``, ``explain`` and ONNX export see; training asks for
``model(images, full=True)``, a :class:`~cxrtool.models.heads.ModelOutput` with what its loss
terms need.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cxrtool._compat import ensure_torchvision_importable

ensure_torchvision_importable()

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from cxrtool.models.heads import ModelOutput, build_head  # noqa: E402
from cxrtool.registry import ARCHITECTURES, PADDINGS  # noqa: E402


class TextBranch(nn.Module):
    """The image side of a dual-branch model (paper 3, after CheXzero): the pooled image
    embedding projected into a sentence encoder's space, and each trained finding's pair of
    prompt embeddings (positive, negative), kept with the weights.

    A finding's zero-shot logit is ``scale * (cos(image, positive) - cos(image, negative))``:
    its sigmoid is CheXzero's softmax over the prompt pair, so training on it (the ``align``
    loss term) trains the very rule that scores a finding no label ever named.
    """

    gives = frozenset({"projection", "zero_shot_logits"})

    def __init__(self, width: int, findings: Sequence[str], dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.dim = int(dim)
        self.projection = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, self.dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), CLIP's start
        self.register_buffer("prompts", torch.zeros(len(findings), 2, self.dim))  # set before training

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """Unit-length image embeddings (B, E) in the text space."""
        return nn.functional.normalize(self.projection(pooled.float()), dim=-1)

    def logits(self, embedding: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """(B, K) zero-shot logits against prompt pairs (K, 2, E) of unit-length embeddings."""
        scale = self.logit_scale.clamp(max=4.6052).exp()  # at most 100, as CLIP
        similarity = torch.einsum("be,kpe->bkp", embedding, prompts.to(embedding.dtype))
        return scale * (similarity[..., 0] - similarity[..., 1])


class CXRClassifier(nn.Module):
    """A timm backbone with a multi-label head (``registry.HEADS``), one logit per finding.

    Example:
        >>> net = CXRClassifier("densenet121", ["Effusion", "Nodule"])
        >>> net(torch.zeros(2, 1, 224, 224)).shape
        torch.Size([2, 2])
    """

    def __init__(
        self,
        architecture: str,
        findings: Sequence[str],
        *,
        pretrained: bool = False,
        drop_rate: float = 0.0,
        output_stride: int = 32,
        head: str = "linear",
        head_settings: Mapping[str, Any] | None = None,
        text_dim: int = 0,
        padding: str = "zeros",
    ) -> None:
        super().__init__()
        if not findings:
            raise ValueError("a classifier needs at least one finding")
        if not timm.is_model(architecture):
            close = timm.list_models(f"*{architecture.split('_')[0]}*")[:8]
            hint = f" (close names: {', '.join(close)})" if close else ""
            raise ValueError(f"unknown timm architecture {architecture!r}{hint}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.architecture = architecture
        self.findings = tuple(findings)
        self.output_stride = output_stride
        # A smaller output stride dilates the last stages instead of striding them: the
        # same weights' shapes, a finer feature map (finer CAMs) for more compute.
        extra = {"output_stride": output_stride} if output_stride != 32 else {}
        # in_chans=1: timm sums the first convolution's RGB weights when loading ImageNet
        # weights, the usual way to start a grey-input model from them.
        try:
            self.backbone = timm.create_model(
                architecture, pretrained=pretrained, num_classes=0, in_chans=1, drop_rate=drop_rate, **extra
            )
        except TypeError as error:
            if extra and "output_stride" in str(error):
                raise ValueError(f"{architecture} cannot dilate its last stages (output_stride {output_stride}): "
                                 "use output_stride 32, or a backbone that can (resnet18, resnet50, ...)") from None
            raise
        self.padding = padding
        set_padding(self.backbone, padding)
        # Some backbones (MobileNetV3) widen features after pooling: head_hidden_size.
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.head = build_head(head, width, self.findings, head_settings)
        # A dual-branch model (text_dim > 0) also places images in a sentence encoder's space.
        self.text = TextBranch(width, self.findings, text_dim) if text_dim else None

    @property
    def gives(self) -> frozenset[str]:
        """The ModelOutput fields beyond the logits its training forward fills."""
        return self.head.gives | (self.text.gives if self.text is not None else frozenset())

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's spatial feature map (B, C, h, w)."""
        return self.backbone.forward_features(images)

    def forward(self, images: torch.Tensor, full: bool = False) -> torch.Tensor | ModelOutput:
        """Logits (B, K); with ``full=True`` the head's whole :class:`ModelOutput` (training:
        under DistributedDataParallel the flag passes through its wrapper)."""
        feature_map = self.features(images)
        pooled = self.backbone.forward_head(feature_map, pre_logits=True)
        output = self.head(feature_map, pooled)
        if not full:
            return output.logits
        if self.text is not None:
            output.projection = self.text.embed(pooled)
            output.zero_shot_logits = self.text.logits(output.projection, self.text.prompts)
        return output

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """The images' unit-length embeddings in the text space (a dual-branch model only)."""
        if self.text is None:
            raise ValueError("this model has no text branch: train it with --preset dual-branch (zero_shot: true)")
        return self.text.embed(self.backbone.forward_head(self.features(images), pre_logits=True))

    @property
    def cam_layer(self) -> str | None:
        """Module name of the CAM target layer, when the registry knows this backbone."""
        known = ARCHITECTURES.get(self.architecture)
        return f"backbone.{known.cam_layer}" if known else None

    @property
    def fused_cam_layers(self) -> str | None:
        """The two shallowest stages' module names joined by '+' (the target the methods of
        ``registry.FUSED_CAM_METHODS`` fuse), when the registry knows this backbone's stages."""
        known = ARCHITECTURES.get(self.architecture)
        return "+".join(f"backbone.{name}" for name in known.fused_layers) if known else None


def set_padding(module: nn.Module, padding: str) -> None:
    """How every padded convolution of ``module`` extends its input past the edge.

    ``zeros`` is timm's (and PyTorch's) default: a frame of zeros around the film, which the
    filters at the edge see and from which the network can read its absolute position
    (Islam et al., "How much position information do convolutional neural networks
    encode?", ICLR 2020). ``replicate`` repeats the edge pixels in every convolution: the
    filters at the film's edge see the film continued. ``replicate_undilated`` does so in
    the undilated convolutions (the stem and the first stages, where the padding is one to
    three pixels or a cell) and leaves the dilated convolutions of a stride-8 or 16 network
    with zeros: their taps reach two to four cells past the edge of a map of about twelve,
    where repeating the edge would stand for a third of the map, and on a CPU a dilated
    convolution padded outside itself costs about 1.5x one padded inside (oneDNN).
    On a network without dilation it is ``replicate``. The convolutions keep their padding
    amounts; only the mode changes, so the weights' shapes and names are the same.
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d) and any(p > 0 for p in _as_pair(layer.padding)):
            undilated = all(d == 1 for d in _as_pair(layer.dilation))
            replicate = padding == "replicate" or (padding == "replicate_undilated" and undilated)
            layer.padding_mode = "replicate" if replicate else "zeros"


def _as_pair(padding) -> tuple[int, ...]:
    return (padding, padding) if isinstance(padding, int) else tuple(padding) if not isinstance(padding, str) else (1,)


def mixed_precision(device: torch.device) -> torch.dtype | None:
    """The dtype training runs its forward pass in under autocast on ``device``, or None for
    full precision: bf16 on a GPU that has it (fp16 on an older one, with a gradient
    scaler), and bf16 on a CPU with bf16 units (Intel AMX or AVX-512 BF16), where oneDNN's
    bf16 convolutions make a step of the demo's ResNet-18 2.9x faster at 96 px and 3.9x at
    128 px on 2 cores (``python benchmarks/precision.py``). A CPU without them would emulate
    bf16, slower than float32: full precision there, as on other devices."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_bf16_units():
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """How a card and the demo name a run's precision: ``bfloat16``, ``float16``, or
    ``float32`` for full precision (``None`` from :func:`mixed_precision`)."""
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"


def _cpu_has_bf16_units() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False


def pick_device(device: str = "auto") -> torch.device:
    """Resolve ``auto|cpu|cuda|cuda:N|mps`` to an available torch device.

    Raises:
        UsageError: when the requested device is not available here.
    """
    from cxrtool.errors import UsageError

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(f"device {device!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    return resolved
