#!/usr/bin/env bash
# Shell-pipeline use: find studies, predict, keep the positive Effusion calls.
# Needs a model, e.g. the demo's: cxrtool demo  (writes cxrtool-demo/model/model.safetensors)
set -euo pipefail
MODEL=${MODEL:-cxrtool-demo/model/model.safetensors}
find "${1:-cxrtool-demo/study/images}" -name '*.dcm' \
  | cxrtool predict - --model "$MODEL" --jsonl --out /tmp/cxrtool-results \
  | python -c '
import json, sys
for line in sys.stdin:
    record = json.loads(line)
    if record.get("status") != "failed" and record["findings"]["Effusion"]["positive"]:
        print(record["file"], record["findings"]["Effusion"]["probability"])
'
