"""What cxrtool writes about studies, typed and versioned, with one reader and one writer.

* The **sidecar** ``NAME.cxrtool.json`` beside a study (or in the ``--out`` mirror): the
  study's identity (file name, where it is, its content's SHA-256, DICOM UIDs, view,
  spacing, size) and one :class:`Result` per model that scored it (probabilities,
  calls, explanations, the settings that produced them). Schema version 2; version 1
  sidecars (one flat record, one model) are read and upgraded.
* The **folder table** ``cxrtool_predictions.csv``: one row per (study, model) of its
  folder, ``file, model, model_id``, one probability column per finding of any model,
  then ``view_position, error``. The folder index ``cxrtool_predictions.json`` lists
  each model's findings and decision thresholds.
* **Already done** (:func:`is_done`): a result counts as done when it was made from the
  same file content, by the same producer (a model's checkpoint digest, or the measuring
  code), with the same settings that change the result. Predict, explain and radiomics
  all decide by it.

A study's results describe one content of its file: when the file changes, the results
made from the old content are stale and are dropped (with the pictures they list)
by the next run that sees the change, so nothing stale stays beside a study.
"""

from __future__ import annotations

# The package's modules, leaves first: provenance (fingerprints, settings digests and the
# "already done" rule), explanations (explain's typed record: Explanation, FindingMap,
# Region), schema (ModelRef, FindingCall, Result, Sidecar, make_result and the
# errors), store (reading and writing sidecars, removing the pictures of stale results),
# tables (the folder tables and indexes, and the radiomics table's columns).
from cxrtool.io.outputs import sidecar_path  # re-exported: callers import it from here too
from cxrtool.io.records.explanations import Explanation, FindingMap, Region
from cxrtool.io.records.provenance import Fingerprint, Provenance, is_done, settings_digest, sha256_file
from cxrtool.io.records.schema import (
    IDENTITY_KEYS,
    MODEL_ID_LENGTH,
    SCHEMA_VERSION,
    SIDECAR_SCHEMA,
    FindingCall,
    ModelRef,
    NewerSchemaError,
    RecordError,
    Result,
    Sidecar,
    StudyFailure,
    make_result,
    now,
)
from cxrtool.io.records.store import (
    SidecarUpdate,
    iter_sidecars,
    read_sidecar,
    relative_source,
    settle_failure,
    store_result,
)
from cxrtool.io.records.tables import (
    INDEX_SCHEMA,
    RADIOMICS_FIRST,
    RADIOMICS_KEY,
    TABLE_FIRST,
    TABLE_LAST,
    FolderOutputs,
    IndexedModel,
    PredictionTable,
    failure_row,
    index_entry,
    read_index,
    read_prediction_tables,
    read_table_rows,
    table_row,
)

__all__ = [
    # explanations
    "Explanation",
    "FindingMap",
    "Region",
    # provenance
    "Fingerprint",
    "Provenance",
    "is_done",
    "settings_digest",
    "sha256_file",
    # schema
    "SIDECAR_SCHEMA",
    "SCHEMA_VERSION",
    "MODEL_ID_LENGTH",
    "IDENTITY_KEYS",
    "RecordError",
    "NewerSchemaError",
    "StudyFailure",
    "ModelRef",
    "FindingCall",
    "Result",
    "Sidecar",
    "make_result",
    "now",
    # store
    "sidecar_path",
    "read_sidecar",
    "iter_sidecars",
    "relative_source",
    "SidecarUpdate",
    "store_result",
    "settle_failure",
    # tables
    "INDEX_SCHEMA",
    "TABLE_FIRST",
    "TABLE_LAST",
    "RADIOMICS_FIRST",
    "RADIOMICS_KEY",
    "table_row",
    "failure_row",
    "FolderOutputs",
    "IndexedModel",
    "index_entry",
    "read_index",
    "read_table_rows",
    "PredictionTable",
    "read_prediction_tables",
]
