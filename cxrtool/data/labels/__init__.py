"""One in-memory label table for every dataset that training and evaluation read.

Three CSV layouts are understood, told apart by their header:

* **NIH ChestX-ray14** (``Data_Entry_2017*.csv``): ``Image Index`` + ``Finding Labels``
  (``|``-separated, ``No Finding`` for none), ``Patient ID``, ``View Position``.
* **CheXpert / MIMIC-CXR-JPG**: a ``Path`` column plus observation columns
  (``Cardiomegaly``, ``Pleural Effusion``...) holding ``1.0``, ``0.0``, ``-1.0`` (uncertain)
  or blank (not mentioned).
* **generic**: a ``path`` column plus one 0/1 column per finding; optional ``patient_id``
  (or ``patient``) and ``view`` columns.

Targets are float32 with 1, 0 or NaN; NaN means "unknown: no loss, no metric".

What lives where (import from this package; the modules are its layout, not its API):

* :mod:`~cxrtool.data.labels.table`: :class:`LabelTable`, :func:`read_labels`,
  ``UNCERTAIN_POLICIES``, ``LABEL_FORMATS``.
* :mod:`~cxrtool.data.labels.formats`: :func:`detect_format` and the per-format parsers
  (NIH, CheXpert/MIMIC-CXR-JPG, PadChest, generic) that ``read_labels`` calls.
* :mod:`~cxrtool.data.labels.views`: :class:`ViewTable` and :func:`read_views` (projections
  by image path).
* :mod:`~cxrtool.data.labels.unlabelled`: :func:`read_unlabelled` (``train --unlabelled``).
* :mod:`~cxrtool.data.labels.splits`: :func:`patient_split`.
* :mod:`~cxrtool.data.labels.boxes`: :class:`Box` and :func:`read_boxes`.
* :mod:`~cxrtool.data.labels._csv`: the shared low-level CSV helpers (opening plain or
  gzipped CSVs, file names, view spellings, header descriptions); it imports none of its
  siblings.
"""

from __future__ import annotations

from cxrtool.data.labels.boxes import Box, read_boxes
from cxrtool.data.labels.formats import detect_format
from cxrtool.data.labels.splits import patient_split
from cxrtool.data.labels.table import LABEL_FORMATS, UNCERTAIN_POLICIES, LabelTable, read_labels
from cxrtool.data.labels.unlabelled import read_unlabelled
from cxrtool.data.labels.views import ViewTable, read_views
from cxrtool.registry import VIEW_POSITIONS

__all__ = [
    "Box",
    "LabelTable",
    "VIEW_POSITIONS",
    "UNCERTAIN_POLICIES",
    "LABEL_FORMATS",
    "detect_format",
    "patient_split",
    "read_boxes",
    "read_labels",
    "read_unlabelled",
    "read_views",
    "ViewTable",
]
