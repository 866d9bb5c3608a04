"""Reports of a model's results in the formats other systems read: the DICOM Structured
Report (:mod:`cxrtool.reports.sr`, the output stage ``sr``: ``cxrtool predict --dicom sr``)
and the DICOM Segmentation of explain's regions (:mod:`cxrtool.reports.seg`, the output
stage ``seg``: ``cxrtool explain --dicom seg``); what they share is in
:mod:`cxrtool.reports._dicom`.

Each module here is an output stage (:mod:`cxrtool.stages`) and loads its dependencies only
when a run asks for it.
"""
