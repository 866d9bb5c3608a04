"""Class activation maps through the grad-cam package, for a whole batch and many findings.

The CAM methods are pytorch-grad-cam's own classes: their ``get_cam_image`` (and the
``get_cam_weights`` behind it) turn a layer's activations and gradients into a map. What
this module adds is the driving, shaped for multi-label radiographs:

- one forward pass per batch, then one cheap backward pass per finding asked for, instead
  of a forward and a full backward for every (image, finding) pair;
- the autograd graph starts at the target layer: the weights are frozen and the layer's
  output is handed on as a fresh leaf, so a backward pass only runs through the layers
  after it (for the last convolutional stage: the pooling and the head). The gradients
  with respect to that layer's output, all that the CAM methods read, are unchanged;
- each image gets its own map for each of its own findings (images in a batch are
  independent, so one summed backward pass yields every image's gradient at once);
- maps stay in the method's raw units (no per-map min-max scaling), so an all-zero map
  reads as "no evidence" rather than being stretched into noise.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from cxrtool._compat import ensure_torchvision_importable

ensure_torchvision_importable()

import torch  # noqa: E402
from pytorch_grad_cam import (  # noqa: E402
    AblationCAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from cxrtool.errors import UsageError  # noqa: E402
from cxrtool.registry import (  # noqa: E402
    ATTENTION_METHOD,
    CAM_METHOD_LABELS,
    DEFAULT_CAM_METHOD,
    FUSED_CAM_METHODS,
    OCCLUSION_METHOD,
)

CAM_METHODS = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
    "scorecam": ScoreCAM,
    "ablationcam": AblationCAM,
}


Wanted = Sequence[Sequence[int]] | Callable[[np.ndarray], Sequence[Sequence[int]]]


class ExplainUsageError(UsageError):
    """A request explain cannot serve (unknown method, layer or finding); names the choices."""


def layer_choices(network: torch.nn.Module, limit: int = 12) -> list[str]:
    """Module names a user could pass as ``--layer``: the backbone's top-level blocks."""
    names = [name for name, _ in network.named_modules() if name.count(".") == 1 and name.startswith("backbone.")]
    return names[:limit]


def resolve_layer(network: torch.nn.Module, name: str | None, method: str | None = None) -> tuple[str, list[torch.nn.Module]]:
    """The target layer(s) by module name (``get_submodule``); ``a+b`` names several, whose
    maps are fused (:class:`CamEngine`). By default the backbone's known target: the fusion
    of its two shallowest stages for the methods of ``registry.FUSED_CAM_METHODS``, else its
    last stage."""
    if not name and method in FUSED_CAM_METHODS:
        name = getattr(network, "fused_cam_layers", None)
    if not name:
        name = getattr(network, "cam_layer", None)
        if not name:
            architecture = getattr(network, "architecture", "this backbone")
            raise ExplainUsageError(
                f"{architecture} has no known CAM layer; pass --layer with a module name, e.g. "
                + ", ".join(layer_choices(network))
            )
    names = [part.strip() for part in name.split("+")]
    if not all(names) or len(set(names)) != len(names):
        raise ExplainUsageError(f"--layer {name!r}: name each module once, several joined by '+' "
                                "(e.g. backbone.layer3+backbone.layer4)")
    modules = []
    for part in names:
        try:
            modules.append(network.get_submodule(part))
        except AttributeError:
            raise ExplainUsageError(
                f"no layer {part!r} in this model; choose a module name such as " + ", ".join(layer_choices(network))
            ) from None
    # in the order the forward pass meets them (the order of registration, for the backbones here)
    rank = {module: k for k, (_, module) in enumerate(network.named_modules())}
    ordered = sorted(zip(names, modules, strict=True), key=lambda pair: rank[pair[1]])
    return "+".join(n for n, _ in ordered), [m for _, m in ordered]


def _graph_starts_here(module, inputs, output):
    # Forward hook on the target layer: what follows sees a leaf that requires grad, so
    # autograd records only the layers after it.
    if isinstance(output, torch.Tensor):
        return output.detach().requires_grad_(True)
    return output


@dataclass
class BatchMaps:
    """The result for one batch: probabilities for every image, maps for what was asked."""

    probabilities: np.ndarray  # (B, n_findings) float64
    maps: dict[tuple[int, int], np.ndarray]  # (image index, finding index) -> (S, S) float32, raw units


class MapEngine:
    """What every map engine shares: use it as a context manager, and ``close`` removes
    whatever it hooked into the network (nothing, unless an engine says otherwise)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass


class CamEngine(MapEngine):
    """A CAM method on a classifier's target layer, computed batch by batch.

    Use as a context manager, so the hooks are removed when done.

    Example:
        >>> with CamEngine(network, "gradcam") as engine:
        ...     result = engine(batch, [[2], [2, 5]])  # finding indices per image
        >>> result.maps[(1, 5)].shape
        (224, 224)
    """

    def __init__(self, network: torch.nn.Module, method: str = DEFAULT_CAM_METHOD, layer: str | None = None) -> None:
        if method not in CAM_METHODS:
            raise ExplainUsageError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHOD_LABELS)}")
        self.method = method
        self.network = network.eval().requires_grad_(False)
        self.layer_name, self.layers = resolve_layer(network, layer, method)
        self.grids = [feature_grid(self.network, module) for module in self.layers]  # (before any hook)
        self._handles = []
        cam_class = CAM_METHODS[method]
        self.cam = cam_class(model=self.network, target_layers=self.layers)
        self.uses_gradients = bool(self.cam.uses_gradients)
        if self.uses_gradients:
            # prepend: must run before the package's own hooks, which attach the gradient
            # hook to the layer's output. Only on the first layer the forward pass meets,
            # so the gradients of the later ones still flow back to it.
            self._handles.append(self.layers[0].register_forward_hook(_graph_starts_here, prepend=True))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.cam.activations_and_grads.release()

    def __call__(self, batch: torch.Tensor, wanted: Wanted) -> BatchMaps:
        """Probabilities for the batch and a map per (image, finding index) in ``wanted``.

        ``wanted`` lists finding indices per image, or is a function of the batch's
        probabilities (B, n_findings) that returns them (e.g. each image's positive calls).
        """
        recorder = self.cam.activations_and_grads
        size = (batch.shape[-2], batch.shape[-1])
        grad_mode = torch.enable_grad() if self.uses_gradients else torch.no_grad()
        with grad_mode:
            outputs = recorder(batch)
        self.cam.outputs = outputs  # AblationCAM reads the unablated scores from here
        probabilities = torch.sigmoid(outputs.detach().float()).cpu().numpy().astype(np.float64)
        if callable(wanted):
            wanted = wanted(probabilities)
        activations = [a.numpy() for a in recorder.activations]  # one per layer, in forward order
        maps: dict[tuple[int, int], np.ndarray] = {}
        findings = sorted({f for per_image in wanted for f in per_image})
        target_free: list[np.ndarray | None] = [None] * len(self.layers)
        for index, finding in enumerate(findings):
            rows = [i for i, per_image in enumerate(wanted) if finding in per_image]
            targets = [ClassifierOutputTarget(finding) for _ in rows]
            gradients: list[np.ndarray | None] = [None] * len(self.layers)
            if self.uses_gradients:
                recorder.gradients = []
                score = outputs[:, finding].sum()  # images are independent: one pass, every image's gradient
                score.backward(retain_graph=index < len(findings) - 1)
                gradients = [g.numpy()[rows] for g in recorder.gradients]
            per_layer = []
            for k, layer in enumerate(self.layers):
                if self.method == "eigencam":
                    # The first principal component of the activations: the same for every finding.
                    if target_free[k] is None:
                        target_free[k] = self._cam_image(batch, layer, targets, activations[k], None)
                    raw = target_free[k][rows]
                else:
                    raw = self._cam_image(batch[rows], layer, targets, activations[k][rows], gradients[k])
                per_layer.append([_upsample(cam, size, self.grids[k]) for cam in raw])
            for j, row in enumerate(rows):
                maps[(row, finding)] = fuse([layer_maps[j] for layer_maps in per_layer])
        recorder.activations.clear()
        recorder.gradients = []
        return BatchMaps(probabilities, maps)

    def _cam_image(self, inputs, layer, targets, activations, gradients) -> np.ndarray:
        # ScoreCAM and AblationCAM draw tqdm bars of their own; keep the terminal ours.
        quiet = contextlib.redirect_stderr(io.StringIO()) if self.method in ("scorecam", "ablationcam") else contextlib.nullcontext()
        with quiet:
            cam = self.cam.get_cam_image(inputs, layer, targets, activations, gradients, eigen_smooth=False)
        cam = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        return np.maximum(cam, 0.0)


def fuse(maps: Sequence[np.ndarray]) -> np.ndarray:
    """One map from the same finding's maps at several layers (on the input grid): each
    divided by its own peak, then averaged, as LayerCAM's authors fuse layers (Jiang et al.,
    2021), so a fine early layer and a coarse late one count alike. One map is returned as it
    is (raw units); a layer whose map is zero everywhere adds nothing, and a fusion of maps
    that are all zero stays zero (no evidence)."""
    if len(maps) == 1:
        return maps[0]
    total = np.zeros_like(maps[0])
    for cam in maps:
        peak = float(cam.max()) if cam.size else 0.0
        if peak > 0:
            total += cam / peak
    return total / len(maps)


@dataclass(frozen=True)
class FeatureGrid:
    """Where a layer's feature cells sit on the input: cell (i, j) is centred on input pixel
    (``offset_y + stride_y * i``, ``offset_x + stride_x * j``), pixel centres at whole numbers."""

    stride_y: float
    offset_y: float
    stride_x: float
    offset_x: float


PROBE_SIZES = (64, 128, 256)  # probe inputs, until the cells' receptive fields fit (512 costs 5-20 s on a CPU)


def feature_grid(network: torch.nn.Module, layer: torch.nn.Module) -> FeatureGrid | None:
    """A layer's :class:`FeatureGrid`, measured on the network itself: for a cell near each
    end of the grid, which pixels of a random input reach it (its receptive field, clipped by
    the input's edge on the near side); the far sides of the two fields, c1 + r and c2 - r,
    give the two centres, the stride being the input's size over the grid's.

    Why: resizing a map from the feature grid to the input (``cv2.resize``, as
    pytorch-grad-cam does) puts cell i's centre at ``stride * (i + 0.5) - 0.5``, but a
    stride-2 convolution or pooling padded on both sides centres its output i on input 2i:
    through a ResNet's stem the stride-4 cells sit on 4i and the stride-8 cells on 8i, so a
    map drawn the plain way lies 1.5 and 3.5 input pixels below and to the right of the
    evidence (15.5 at stride 32). Seen on the demo: of 37 atelectasis peaks outside their
    box, 26 lay below it and 16 to its right, none above or to its left. Measured rather than worked out
    from the layers' settings, so any backbone gets its own (a DenseNet's 2x2 poolings centre
    on 2i + 0.5). None where it cannot be measured (not a convolutional feature map, a
    network that takes one input size only, a receptive field wider than the largest probe:
    a DenseNet-121's or an EfficientNet's last stage): the plain resize then.
    """
    first = next((m for m in network.modules() if isinstance(m, torch.nn.Conv2d)), None)
    parameter = next(network.parameters(), None)
    if first is None or parameter is None:
        return None
    captured: dict[str, torch.Tensor] = {}

    def keep(module, inputs, output):
        captured["output"] = output

    handle = layer.register_forward_hook(keep)
    generator = torch.Generator().manual_seed(0)
    was_training = network.training
    network.eval()
    try:
        for size in PROBE_SIZES:
            probe = torch.randn(4, first.in_channels, size, size, generator=generator).to(parameter.device, parameter.dtype)
            probe.requires_grad_(True)
            with torch.enable_grad():
                try:
                    network(probe)
                except (RuntimeError, ValueError, AssertionError):
                    return None  # a network that takes one input size only (a ViT): not a grid to measure
                output = captured.get("output")
                if not isinstance(output, torch.Tensor) or output.dim() != 4:
                    return None
                height, width = output.shape[-2:]
                if min(height, width) < 4 or size % height or size % width:
                    continue
                fields = []
                for i, j in ((1, 1), (height - 2, width - 2)):
                    (gradient,) = torch.autograd.grad(output[:, :, i, j].sum(), probe, retain_graph=True)
                    reach = gradient.detach().abs().sum(dim=(0, 1)).cpu().numpy() > 0
                    rows, cols = np.flatnonzero(reach.any(axis=1)), np.flatnonzero(reach.any(axis=0))
                    if rows.size == 0 or cols.size == 0:
                        return None
                    fields.append((rows[0], rows[-1], cols[0], cols[-1]))
            (_, bottom, _, right), (top, _, left, _) = fields
            if bottom >= size - 1 or right >= size - 1 or top <= 0 or left <= 0:
                continue  # a field reaches across the probe: a larger one
            stride_y, stride_x = size / height, size / width
            # c1 + r = bottom, c2 - r = top, c2 - c1 = stride * (height - 3)
            offset_y = (bottom + top - stride_y * (height - 3)) / 2 - stride_y
            offset_x = (right + left - stride_x * (width - 3)) / 2 - stride_x
            return FeatureGrid(float(stride_y), float(offset_y), float(stride_x), float(offset_x))
        return None
    finally:
        handle.remove()
        network.train(was_training)


def _upsample(cam: np.ndarray, size: tuple[int, int], grid: FeatureGrid | None = None) -> np.ndarray:
    """A feature-grid map to the input grid, bilinear; each cell's value on the input pixel
    its :class:`FeatureGrid` centres it on (without one, as pytorch-grad-cam resizes its maps,
    which assumes cells centred in their strides), held flat beyond the outer cells."""
    if grid is None or cam.shape == size:
        return cv2.resize(cam, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    to_cells = np.array([[1.0 / grid.stride_x, 0.0, -grid.offset_x / grid.stride_x],
                         [0.0, 1.0 / grid.stride_y, -grid.offset_y / grid.stride_y]])
    return cv2.warpAffine(np.ascontiguousarray(cam, dtype=np.float32), to_cells, (size[1], size[0]),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)


class AttentionEngine(MapEngine):
    """The ``attention`` map method: each finding's cross-attention over the feature grid,
    from a head that gives it (the decoder head), upsampled to the input as the CAMs are.

    No gradients: one forward pass per batch gives every finding's map. The maps are
    attention weights (each sums to 1 over the grid), so their units differ from a CAM's;
    regions, boxes and the localization metrics treat them alike. Same interface as
    :class:`CamEngine`.
    """

    method = ATTENTION_METHOD
    uses_gradients = False

    def __init__(self, network: torch.nn.Module, layer: str | None = None) -> None:
        head = getattr(network, "head", None)
        if "attention" not in getattr(head, "gives", ()):
            raise ExplainUsageError(f"--cam {ATTENTION_METHOD} needs a head with attention maps (decoder); this model's head is "
                                    f"{getattr(head, 'name', 'unknown')!r}: use a CAM method such as {DEFAULT_CAM_METHOD}")
        if layer:
            raise ExplainUsageError(f"--cam {ATTENTION_METHOD} reads the head's own attention: it takes no --layer")
        self.network = network.eval()
        self.layer_name = "head.attention"
        last = getattr(network, "cam_layer", None)  # the head attends over the last stage's grid
        self.grid = feature_grid(network, network.get_submodule(last)) if last else None

    def __call__(self, batch: torch.Tensor, wanted: Wanted) -> BatchMaps:
        size = (batch.shape[-2], batch.shape[-1])
        with torch.no_grad():
            output = self.network(batch, full=True)
        probabilities = torch.sigmoid(output.logits.float()).cpu().numpy().astype(np.float64)
        if callable(wanted):
            wanted = wanted(probabilities)
        attention = output.attention.float().cpu().numpy()
        maps = {(row, finding): _upsample(attention[row, finding], size, self.grid) for row, per_image in enumerate(wanted)
                for finding in per_image}
        return BatchMaps(probabilities, maps)


class OcclusionEngine(MapEngine):
    """The ``occlusion`` map method (Zeiler and Fergus, 2014): a square patch slides over the
    input, is filled from a heavily blurred copy of the image (the evidence taken out, the
    exposure kept: :func:`cxrtool.explain.faithfulness.removed_canvas`), and each pixel's
    value is the mean fall of the finding's logit over the patches that covered it, where
    positive. No gradients and no layer: it asks the model itself which parts it needs, so
    it is faithful by construction and costs one forward pass per patch position (121 at
    the default size on a 96 px input). Same interface as :class:`CamEngine`.
    """

    method = OCCLUSION_METHOD
    uses_gradients = False

    def __init__(self, network: torch.nn.Module, layer: str | None = None, *, patch_fraction: float = 1 / 6,
                 chunk: int = 128) -> None:
        if layer:
            raise ExplainUsageError(f"--cam {OCCLUSION_METHOD} perturbs the input: it takes no --layer")
        self.network = network.eval()
        self.layer_name = "input"
        self.patch_fraction = patch_fraction
        self.chunk = chunk

    def positions(self, size: int) -> tuple[int, list[tuple[int, int]]]:
        """The patch side and its top-left corners: half a patch apart, the last flush with the edge."""
        patch = max(2, round(size * self.patch_fraction))
        stride = max(1, patch // 2)
        starts = sorted(set(range(0, size - patch + 1, stride)) | {size - patch})
        return patch, [(y, x) for y in starts for x in starts]

    def __call__(self, batch: torch.Tensor, wanted: Wanted) -> BatchMaps:
        from cxrtool.explain.faithfulness import removed_canvas

        size = batch.shape[-1]
        with torch.no_grad():
            base = self.network(batch).float()
        probabilities = torch.sigmoid(base).cpu().numpy().astype(np.float64)
        if callable(wanted):
            wanted = wanted(probabilities)
        patch, corners = self.positions(size)
        cover = np.zeros((size, size), dtype=np.float32)
        for y, x in corners:
            cover[y:y + patch, x:x + patch] += 1
        maps: dict[tuple[int, int], np.ndarray] = {}
        images = batch.detach().float().cpu().numpy()
        for row, findings in enumerate(wanted):
            if not findings:
                continue
            image = images[row, 0]
            canvas = removed_canvas(image)
            drops = np.empty((len(corners), base.shape[1]), dtype=np.float32)
            for start in range(0, len(corners), self.chunk):
                part = corners[start:start + self.chunk]
                copies = np.repeat(image[None], len(part), axis=0)
                for k, (y, x) in enumerate(part):
                    copies[k, y:y + patch, x:x + patch] = canvas[y:y + patch, x:x + patch]
                tensor = torch.from_numpy(copies[:, None]).to(batch.device, batch.dtype).contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    drops[start:start + len(part)] = (base[row][None] - self.network(tensor).float()).cpu().numpy()
            for finding in findings:
                total = np.zeros((size, size), dtype=np.float32)
                for k, (y, x) in enumerate(corners):
                    total[y:y + patch, x:x + patch] += drops[k, finding]
                maps[(row, finding)] = np.maximum(total / cover, 0.0)
        return BatchMaps(probabilities, maps)


def make_engine(network: torch.nn.Module, method: str = DEFAULT_CAM_METHOD, layer: str | None = None):
    """The engine of a map method: a grad-cam CAM, the head's attention, or occlusion."""
    if method == ATTENTION_METHOD:
        return AttentionEngine(network, layer)
    if method == OCCLUSION_METHOD:
        return OcclusionEngine(network, layer)
    return CamEngine(network, method, layer)
