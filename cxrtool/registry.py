"""The single source of truth for names: label sets, architectures and their CAM layers,
losses, CAM methods, threshold methods, uncertainty policies, output formats.

Import-light on purpose (no torch, no timm): the CLI takes its choices from here and
``cxrtool models`` lists it instantly; the modules that implement each name check their
own tables against these. Heads and loss terms register where they are defined, with
their descriptions and settings (:mod:`cxrtool.components`); :data:`HEADS` and
:data:`LOSSES` here are the torch-free copies of those registrations' names and
descriptions, checked against them.
"""

from __future__ import annotations

from dataclasses import dataclass

# The 14 ChestX-ray14 findings in the conventional order (Wang et al., 2017).
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

# The 14 CheXpert / MIMIC-CXR-JPG observations, in their CSV column order.
CHEXPERT_FINDINGS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# What the phantom generator can draw, named as in ChestX-ray14 so NIH tooling applies.
PHANTOM_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Mass",
    "Nodule",
    "Pneumothorax",
    "Consolidation",
    "Edema",
)

# One finding, spelled differently by different data sets and models -> the name cxrtool
# compares by (NIH ChestX-ray14's, which TorchXRayVision's models use too). Only true
# synonyms: CheXpert's "Lung Lesion" and "Enlarged Cardiomediastinum" are spelled alike in
# XRV and need no entry, and are not NIH's "Nodule"/"Mass" or "Cardiomegaly".
FINDING_ALIASES: dict[str, str] = {
    "Infiltrate": "Infiltration",  # NIH's box file against its labels
    "Pleural Effusion": "Effusion",  # CheXpert, MIMIC-CXR against NIH and XRV
    "Pleural Thickening": "Pleural_Thickening",  # PadChest-style spelling against NIH and XRV
}

# CXR-LT 2026 (PadChest and NIH, about 145,000 images): Task 1's 30 findings, spelled as the
# challenge spells them (PadChest's lower-case names among them), and the six findings of
# Task 2 that no training label has (scored zero-shot).
CXR_LT_2026_FINDINGS: tuple[str, ...] = (
    "Normal", "aortic elongation", "cardiomegaly", "pleural effusion", "Nodule", "atelectasis",
    "pleural thickening", "aortic atheromatosis", "Support Devices", "alveolar pattern", "fracture", "Hernia",
    "Emphysema", "azygos lobe", "Hydropneumothorax", "Kyphosis", "Mass", "Pneumothorax", "Subcutaneous Emphysema",
    "pneumoperitoneo", "vascular hilar enlargement", "vertebral degenerative changes", "hyperinflated lung",
    "interstitial pattern", "central venous catheter", "hypoexpansion", "bronchiectasis", "hemidiaphragm elevation",
    "sternotomy", "calcified densities",
)
CXR_LT_2026_UNSEEN: tuple[str, ...] = ("Scoliosis", "Osteopenia", "Bulla", "Infarction", "Adenopathy", "Goiter")

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "nih14": NIH_FINDINGS,
    "chexpert14": CHEXPERT_FINDINGS,
    "phantom8": PHANTOM_FINDINGS,
    "cxr-lt-2026": CXR_LT_2026_FINDINGS,
    "cxr-lt-2026-unseen": CXR_LT_2026_UNSEEN,
}


@dataclass(frozen=True)
class Architecture:
    """What cxrtool knows about a timm backbone."""

    name: str  # timm model name
    cam_layer: str  # module name (get_submodule) of the last spatial feature layer
    note: str = ""
    # The backbone's stages, shallow to deep (their last is, or ends at, cam_layer): the
    # methods of FUSED_CAM_METHODS fuse the first two by default. Given where the fusion was
    # measured (the ResNets, benchmarks/localization.py); elsewhere they read cam_layer.
    stages: tuple[str, ...] = ()

    @property
    def fused_layers(self) -> tuple[str, ...]:
        return self.stages[:2] if len(self.stages) >= 2 else (self.cam_layer,)


_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")

# Tested backbones. Any other timm name works for train/predict; these also know their
# CAM target layer, so `explain` needs no --layer flag.
ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("densenet121", "features.norm5", "CheXNet-style default"),
        Architecture("resnet18", "layer4", "small, fast on CPU", _RESNET_STAGES),
        Architecture("resnet34", "layer4", stages=_RESNET_STAGES),
        Architecture("resnet50", "layer4", stages=_RESNET_STAGES),
        Architecture("resnet10t", "layer4", "tiny ResNet, demo-sized", _RESNET_STAGES),
        Architecture("convnext_tiny", "stages.3"),
        Architecture("convnext_nano", "stages.3"),
        Architecture("efficientnet_b0", "conv_head"),
        Architecture("efficientnet_b3", "conv_head"),
        Architecture("mobilenetv3_large_100", "blocks"),
        Architecture("regnetx_002", "s4", "RegNetX-200MF: fastest to train on a CPU"),
        Architecture("regnetx_004", "s4"),
    )
}

DEFAULT_ARCHITECTURE = "densenet121"

@dataclass(frozen=True)
class PretrainedWeights:
    """A weight set another library publishes that `cxrtool models import` turns into a
    cxrtool checkpoint. Findings and operating points are read from the library itself at
    import time (it is the authority on them)."""

    name: str  # the library's own name for the set
    library: str  # "torchxrayvision"
    architecture: str  # the timm backbone its weights load into
    input_size: int
    trained_on: str
    licence: str = "Apache-2.0 (TorchXRayVision's code and weights); the training data sets' own terms apply"


_XRV_SETS = (
    ("densenet121-res224-all", "densenet121", 224,
     "NIH ChestX-ray14, PadChest, CheXpert, MIMIC-CXR (CheXpert labeller), Google, OpenI, RSNA Pneumonia"),
    ("densenet121-res224-nih", "densenet121", 224, "NIH ChestX-ray14"),
    ("densenet121-res224-pc", "densenet121", 224, "PadChest"),
    ("densenet121-res224-chex", "densenet121", 224, "CheXpert"),
    ("densenet121-res224-rsna", "densenet121", 224, "RSNA Pneumonia Challenge"),
    ("densenet121-res224-mimic_nb", "densenet121", 224, "MIMIC-CXR (NegBio labeller)"),
    ("densenet121-res224-mimic_ch", "densenet121", 224, "MIMIC-CXR (CheXpert labeller)"),
    ("resnet50-res512-all", "resnet50", 512, "PadChest, NIH ChestX-ray14, RSNA Pneumonia, SIIM-ACR Pneumothorax, VinDr-CXR"),
)
# TorchXRayVision's classifiers, importable as `xrv:NAME`.
XRV_WEIGHTS: dict[str, PretrainedWeights] = {
    name: PretrainedWeights(name, "torchxrayvision", arch, size, data) for name, arch, size, data in _XRV_SETS
}

# Classification heads on the backbone: the card's `head`, train's --head. Each is a class
# in cxrtool.models.heads, registered there (@register_head) with its description and its
# settings. This table is a copy of the names and descriptions, because the command line
# reads them at import (--head's choices, the help, `cxrtool models`) and registering means
# importing torch, which `import cxrtool.registry` and `import cxrtool.cli` must not. It is
# checked, not trusted: a registration whose description differs is refused, and
# cxrtool.models.heads refuses to import unless this table lists exactly the heads it
# registers. A head registered elsewhere (your own) is added to it when it registers.
HEADS: dict[str, str] = {
    "linear": "one logit per finding from the pooled feature vector (CheXNet-style)",
    "lse": "a score map per finding, log-sum-exp pooled (ChestX-ray14's): the logit comes from where the map is high",
    "decoder": "per-finding queries cross-attend to the spatial features, one classifier each (paper 1's decoupling)",
    "lga": "the decoder, its queries from attention among the findings' text embeddings biased by co-occurrence (paper 1)",
    "label_features": "a feature per finding by class-specific spatial attention, related by self-attention (paper 2)",
}
# The head `train` builds unless told otherwise: with LSE pooling the logit comes from where
# its score map is high, so the maps point at the finding (benchmarks/localization.py: on
# the demo's phantoms at stride 8, Grad-CAM pointing 0.40 -> 0.56, held-out AUROC 0.893 -> 0.916).
DEFAULT_HEAD = "lse"

# Training loss terms, combined in a loss expression such as `asl` or `asl+0.2*apcl`. Each
# is registered in cxrtool.train.losses (@register_loss) with its description and its
# settings; this table is the torch-free copy of the names and descriptions, kept and
# checked as HEADS is (cxrtool.train.losses refuses to import unless it lists exactly the
# terms registered there).
LOSSES: dict[str, str] = {
    "bce": "binary cross-entropy",
    "weighted_bce": "binary cross-entropy, positives weighted by negatives/positives per finding",
    "focal": "focal loss (Lin et al., 2017)",
    "asl": "asymmetric loss (Ridnik et al., 2021)",
    "apcl": "adaptive prototype contrastive loss on per-finding features (paper 1)",
    "lcc": "consistency of per-image and global label correlations (paper 2)",
    "lcsupcon": "label-correlation-guided multi-label supervised contrastive loss (paper 2)",
    "align": "image-text alignment: the image against each finding's positive and negative prompt (paper 3's dual branch)",
    "radiomics": "NT-Xent between the image and the radiomics of its own map's region, renewed by feedback cycles (paper 4)",
}
DEFAULT_LOSS = "asl"

# Presets: a paper's recipe as settings (train's --preset), under the YAML file and flags.
PRESETS: dict[str, dict[str, object]] = {
    "prototypes": {"head": "lga", "loss": "asl+0.2*apcl"},  # paper 1: LGA + decoder + ASL + APCL
    "label-correlation": {"head": "label_features", "loss": "bce+0.1*lcc+0.2*lcsupcon"},  # paper 2
    # paper 3: contrastive alignment + 1.5 x ASL, on the linear head it was measured with
    "dual-branch": {"head": "linear", "zero_shot": True, "loss": "1.5*asl+align"},
    # paper 4: focal loss (alpha 0.25, gamma 2, as its code) and the radiomics contrast on
    # the pooled features, weighted 0.7 : 0.3 as the weighting its code leaves commented
    # out (the paper does not give one), with a feedback cycle every epoch. On the LSE head,
    # not the paper's linear one: the linear head's Grad-CAM regions lie on the film's edge
    # as often as chance would put them, the LSE head's Grad-CAM is its score map (README,
    # "Paper 4: the radiomics feedback loop")
    "radiomics-feedback": {"head": "lse", "loss": "0.7*focal+0.3*radiomics", "focal_alpha": 0.25, "focal_gamma": 2.0,
                           "feedback_every": 1},
}

# How per-finding decision thresholds are chosen on validation data.
THRESHOLD_METHODS: dict[str, str] = {"f1": "maximise F1", "youden": "maximise Youden's J (sensitivity + specificity - 1)"}

# Label table layouts ("auto" detects them from the header).
LABEL_FORMATS: tuple[str, ...] = ("auto", "nih", "chexpert", "padchest", "generic")

# What a CheXpert / MIMIC-CXR "-1" (uncertain) label becomes.
UNCERTAIN_POLICIES: dict[str, str] = {"ignore": "left out of the loss and the metrics", "positive": "1", "negative": "0"}

# Map methods of explain, with the label shown on overlays: the grad-cam package's CAMs
# (cxrtool.explain.cams maps each to its class), `attention`, the per-finding
# cross-attention of a head that has it (the decoder head's), and `occlusion`, the fall of
# the finding's logit when a patch of the input is blurred away.
CAM_METHOD_LABELS: dict[str, str] = {
    "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "hirescam": "HiResCAM", "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM", "eigencam": "Eigen-CAM", "scorecam": "Score-CAM", "ablationcam": "Ablation-CAM",
    "attention": "decoder attention", "occlusion": "occlusion",
}
ATTENTION_METHOD = "attention"
# Methods whose default target is a fusion of the backbone's two shallowest stages (each
# stage's map scaled to its peak, then averaged): LayerCAM was made to be read from several
# layers (Jiang et al., 2021), and its elementwise positive gradients keep the shallow
# stages' maps sharp and class-specific where Grad-CAM's channel weights blur them; the
# shallow stages have the finest grid (output stride 4 and 8 on a ResNet), which thin and
# small findings need. The others read the last stage.
FUSED_CAM_METHODS = ("layercam",)
# How a network's convolutions extend the image past its edge (cxrtool.models.network.set_padding):
# zeros (PyTorch's), replicate (every padded convolution repeats the edge) or
# replicate_undilated (the undilated ones do; the dilated ones of a stride-8/16 network keep
# zeros; measured against zeros on the demo in the README's "Do the maps point at the finding?").
PADDINGS = ("zeros", "replicate", "replicate_undilated")
OCCLUSION_METHOD = "occlusion"
# LayerCAM over the backbone's two shallowest stages: on the demo's model (benchmarks/
# localization.py) it points at the finding more often than Grad-CAM at the last stage
# (0.67 against 0.56) and than LayerCAM over the last three stages (0.60), and is more
# faithful (insertion - deletion 0.474 against 0.277 and 0.435); on the --full demo's model
# 0.65 against 0.61 for the last three stages (README, "Which stages LayerCAM fuses").
DEFAULT_CAM_METHOD = "layercam"

# What runs a network for predict (cxrtool.models.runtime): auto = ONNX Runtime on a CPU
# when it is installed, else PyTorch.
RUNTIMES: tuple[str, ...] = ("auto", "torch", "onnx")
MAP_FORMATS: tuple[str, ...] = ("png", "npy")

# A radiograph's projection, as read from a DICOM tag or a label table, or predicted by a
# view classifier (`cxrtool train --task view`, whose findings are the first three).
VIEW_POSITIONS: tuple[str, ...] = ("PA", "AP", "LATERAL", "UNKNOWN")
PROJECTIONS: tuple[str, ...] = VIEW_POSITIONS[:3]
# How `cxrtool train` draws an epoch's images: every image once, shuffled; or class-aware
# (a finding uniformly, then one of its positive images), against the long tail.
SAMPLINGS: dict[str, str] = {"uniform": "every training image once an epoch, shuffled",
                             "class_aware": "a finding chosen uniformly, then one of its positive images"}
# What `cxrtool train` learns: findings (multi-label), or the projection (a view classifier).
TASKS: dict[str, str] = {"findings": "findings of the label table (multi-label)",
                         "view": "the projection (PA, AP, LATERAL) of the label table's view column: a view classifier"}

# Test-time augmentation of predict (cxrtool.preprocess.TestTimeAugmentation): copies of
# each study that go through the model in the same forward passes, their probabilities
# averaged. A horizontal flip only when asked (--tta-flip): it moves the heart.
TTA_MODES: dict[str, str] = {
    "none": "the study as it is",
    "light": "3 copies: as it is, zoomed in 10% and out 10%",
    "strong": "7 copies: light, and shifted 5% of the side left, right, up and down",
}

# Bundles (cxrtool.models.sources.bundle): the routes a study can take by its projection
# (default: any projection without its own route), and how a route's members are merged.
BUNDLE_ROUTES: tuple[str, ...] = (*PROJECTIONS, "default")
ENSEMBLE_MERGES: dict[str, str] = {
    "mean": "the mean of the members' probabilities",
    "weighted": "the mean weighted by each member's weight",
    "rank": "the mean of each member's percentile among its own validation scores (from models calibrate)",
}
DEFAULT_MERGE = "mean"


def resolve_finding(name: str) -> str:
    """Map a finding spelling to its canonical name (e.g. ``Infiltrate`` -> ``Infiltration``)."""
    return FINDING_ALIASES.get(name, name)


def _plain(name: str) -> str:
    return " ".join(name.strip().strip("'\"").replace("_", " ").casefold().split())


_PLAIN_ALIASES = {_plain(alias): _plain(canonical) for alias, canonical in FINDING_ALIASES.items()}


def finding_key(name: str) -> str:
    """A finding's name as compared across spellings: case, underscores, spaces and quotes
    aside, aliases resolved (``'pleural effusion'``, ``Pleural_Effusion`` and ``Effusion``
    are one finding)."""
    key = _plain(name)
    return _PLAIN_ALIASES.get(key, key)
