#!/bin/bash
# The README's bundle session ("A session: routing, TTA and a zero-shot prompt"), in the
# current folder: phantoms, three route models, a dual-branch model and a view classifier,
# the bundle (examples/bundle.yaml), its calibration, predict with TTA and a zero-shot
# prompt, evaluate. About 15 minutes on 2 CPU cores.
set -euo pipefail
export HF_HUB_OFFLINE=1
here=$(cd "$(dirname "$0")" && pwd)
python - <<'PY'
from cxrtool.data.phantom import generate_cohort
mix = {"PA": 0.5, "AP": 0.3, "LATERAL": 0.2}
generate_cohort("cxr/train", n_images=1500, size=128, seed=0, view_probabilities=mix, write_masks=False)
generate_cohort("cxr/val", n_images=300, size=128, seed=1, view_probabilities=mix, write_masks=False, first_patient_id=50_001)
generate_cohort("cxr/study", n_images=240, size=256, seed=2, view_probabilities=mix, write_masks=False,
                first_patient_id=90_001, image_format="dicom")
generate_cohort("cxr/scans", n_images=60, size=256, seed=3, view_probabilities=mix, write_masks=False, first_patient_id=95_001)
PY
SEEN=Atelectasis,Cardiomegaly,Effusion,Nodule,Pneumothorax,Consolidation,Edema   # the phantoms' findings but Mass
for route in PA AP LATERAL; do
  cxrtool train cxr/train/Data_Entry.csv --projections $route --findings $SEEN \
    --arch resnet18 --input-size 64 --epochs 6 -b 32 --seed 0 --out runs/${route,,}
done
cxrtool train cxr/train/Data_Entry.csv --preset dual-branch --findings $SEEN --arch resnet18 --input-size 96 \
  --epochs 6 -b 32 --seed 0 --out runs/dual
cxrtool train cxr/train/Data_Entry.csv --task view --arch resnet18 --input-size 64 --epochs 6 -b 32 --seed 0 --out runs/view
cp "$here/bundle.yaml" bundle.yaml
cxrtool models calibrate bundle.yaml --labels cxr/val/Data_Entry.csv --tta light
cxrtool predict cxr/study/images cxr/scans/images -m bundle.yaml --tta light \
  --zero-shot "Mass: a solid rounded opacity larger than 3 cm"
cxrtool evaluate cxr/study/images --labels cxr/study/Data_Entry.csv --bootstrap 200
