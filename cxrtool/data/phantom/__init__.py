"""Synthetic chest radiographs ("phantoms") with ground truth: cxrtool's embedded cohort.

No real pretrained chest X-ray weights or images can be shipped, so demos, tests and
benchmarks train on phantoms instead. A phantom is drawn the way a radiograph forms: an
attenuation map (soft tissue, bone and blood add, air in the lungs takes away) is built in
patient millimetres, projected onto the detector grid with the patient's size, rotation and
position, blurred, given quantum (Poisson-like) noise and windowed, so bone and dense tissue
are bright and air is dark.

Findings follow their radiological appearance and come with pixel masks and boxes:

* Cardiomegaly: cardiothoracic ratio (CTR) > 0.5 (normal 0.38-0.48; recorded per image).
* Effusion: homogeneous basal opacity that blunts the costophrenic angle, meniscus rising
  laterally (posteriorly on a lateral film), one or both sides.
* Nodule (< 3 cm) and Mass (> 3 cm, lobulated): round opacities inside a lung field.
* Pneumothorax: apical/lateral rim of pure air without lung markings, thin visceral
  pleural line at the retracted lung edge.
* Consolidation: dense patchy lobar opacity with air bronchograms.
* Edema: bilateral perihilar "bat-wing" haze, blurred vessels, Kerley-B lines.
* Atelectasis: plate-like band or lobar wedge with volume loss (raised hemidiaphragm,
  mediastinal shift).

:func:`generate_cohort` writes a folder that imitates the NIH ChestX-ray14 release
(``images/``, ``Data_Entry.csv``, ``BBox_List.csv``) as PNG or as real DICOM (DX/CR,
MONOCHROME1/2, four lossless transfer syntaxes), plus per-finding masks.

Everything is seeded and deterministic: the same seed gives the same pixels, labels and
DICOM UIDs, whatever the number of worker processes.
"""

from __future__ import annotations

# The package's modules, leaves first: constants (vocabulary and numbers), records (the
# dataclasses), frame (drawing helpers, the canvas-to-detector frame), sampling (findings,
# patients, per-image geometry), anatomy (normal canvases), findings, rendering
# (exposure, render_case), dicom (the DICOM writer), cohort (generate_cohort and the files).
from cxrtool.data.phantom.cohort import contact_sheet, generate_cohort, write_study_folder
from cxrtool.data.phantom.constants import CTR_THRESHOLD, NIH_BBOX_HEADER, NIH_DATA_ENTRY_HEADER, TRANSFER_SYNTAXES, VIEWS
from cxrtool.data.phantom.records import CohortInfo, PhantomCase, PhantomPatient
from cxrtool.data.phantom.rendering import render_case
from cxrtool.data.phantom.sampling import sample_findings, sample_patient

__all__ = [
    "PhantomCase",
    "PhantomPatient",
    "CohortInfo",
    "CTR_THRESHOLD",
    "VIEWS",
    "TRANSFER_SYNTAXES",
    "NIH_DATA_ENTRY_HEADER",
    "NIH_BBOX_HEADER",
    "render_case",
    "sample_findings",
    "sample_patient",
    "generate_cohort",
    "write_study_folder",
    "contact_sheet",
]
