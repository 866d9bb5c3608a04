"""The classifier: any timm backbone on grey input, with a multi-label head.

The backbone is kept separate from the head so that later heads (per-finding decoders,
projection heads) can use the spatial feature map, and so that the CAM target layer has a
stable name: ``backbone.<layer from the registry>``.
"""

from __future__ import annotations

from collections.abc import Sequence

from cxrtool._compat import ensure_torchvision_importable

ensure_torchvision_importable()

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from cxrtool.registry import ARCHITECTURES  # noqa: E402


class CXRClassifier(nn.Module):
    """A timm backbone with a linear multi-label head, one logit per finding.

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
        self.backbone = timm.create_model(
            architecture, pretrained=pretrained, num_classes=0, in_chans=1, drop_rate=drop_rate, **extra
        )
        # Some backbones (MobileNetV3) widen features after pooling: head_hidden_size.
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.head = nn.Linear(width, len(self.findings))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's spatial feature map (B, C, h, w)."""
        return self.backbone.forward_features(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone.forward_head(self.features(images), pre_logits=True)
        return self.head(pooled)

    @property
    def cam_layer(self) -> str | None:
        """Module name of the CAM target layer, when the registry knows this backbone."""
        known = ARCHITECTURES.get(self.architecture)
        return f"backbone.{known.cam_layer}" if known else None


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
