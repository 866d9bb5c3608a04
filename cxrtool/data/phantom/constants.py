"""The phantoms' vocabulary (views, DICOM terms, NIH file headers) and the numbers that
shape them: adult anatomy in millimetres, cardiothoracic ratios, finding sizes, attenuation
and exposure. A leaf: every other module of the package may import it."""

from __future__ import annotations

# --------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------

VIEWS: tuple[str, ...] = ("PA", "AP", "LATERAL")
DEFAULT_VIEW_PROBABILITIES: dict[str, float] = {"PA": 0.6, "AP": 0.3, "LATERAL": 0.1}
# DICOM ViewPosition defined terms (PS3.3 C.8.11.5); laterals are written "LL" there and in
# the CSV, which cxrtool's label reader maps back to "LATERAL".
DICOM_VIEW_POSITION: dict[str, str] = {"PA": "PA", "AP": "AP", "LATERAL": "LL"}

# Short names accepted by ``transfer_syntaxes`` -> DICOM transfer syntax UIDs (all lossless).
TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "rle": "1.2.840.10008.1.2.5",  # RLE Lossless
    "jpeg-ls": "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "jpeg2000": "1.2.840.10008.1.2.4.90",  # JPEG 2000 Image Compression (Lossless Only)
}

NIH_DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
NIH_BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
NO_FINDING = "No Finding"

# --------------------------------------------------------------------------------------
# Anatomy of an average adult, in millimetres (x: patient's left = image right, y: down;
# origin near the middle of the thorax). Per-patient scale factors multiply these.
# --------------------------------------------------------------------------------------

FIELD_OF_VIEW_MM = (345.0, 420.0)  # detector field covered by the whole image
THORAX_HALF_WIDTH_MM = 136.0  # midline to inner rib margin at the costophrenic angle
APEX_Y_MM = -150.0  # lung apex
CP_ANGLE_Y_MM = 100.0  # lateral costophrenic angle (right)
APEX_X_FRACTION = 0.37  # the apex dome tops out ~1/3 of the hemithorax width from the midline
LATERAL_WIDEST_FRACTION = 0.40  # the apical curve of the lateral border ends this far down
MEDIAL_CURVE_FRACTION = 0.12  # the medial border meets the mediastinum this far down
LUNG_BASE_FLARE_MM = 20.0  # the lungs widen towards the bases (a rounded triangle)
DOME_PEAK_X_FRACTION = 0.44  # hemidiaphragm dome peak, fraction of the hemithorax width
DOME_RISE_MM = 44.0  # dome peak above the costophrenic angle
DOME_LATERAL_EXPONENT = 2.25  # >2 steepens the dome laterally: sharp, acute CP angles
LEFT_DOME_DROP_MM = 16.0  # the left hemidiaphragm sits lower (the liver pushes the right up)
MEDIASTINUM_HALF_WIDTH_MM = 28.0
AORTIC_KNOB = (-86.0, 17.0, 15.0)  # (y, bulge into the left lung, vertical sd) in mm
CHEST_WALL_MM = 24.0  # ribs + muscle + fat lateral to the lungs
NECK_HALF_WIDTH_MM = 52.0
SHOULDER_BULGE_MM = 34.0
SPINE_HALF_WIDTH_MM = (19.0, 25.0)  # upper thoracic -> lumbar
VERTEBRA_HEIGHT_MM = 25.0
TRACHEA_HALF_WIDTH_MM = 8.0
CARINA_BELOW_APEX_MM = 88.0
HILUM_X_FRACTION = (0.30, 0.38)  # hilum distance from the midline / hemithorax width
HILUM_Y_FRACTION = (0.36, 0.44)  # hilum below the apex / lung height
CLAVICLE_HALF_THICKNESS_MM = 7.5
RIB_HALF_THICKNESS_MM = (3.6, 5.8)  # posterior rib 1 -> rib 10
RIB_FIRST_SPACING_MM = (15.0, 19.0)
RIB_SPACING_GROWTH_MM = (0.8, 1.4)  # spacing grows by this per rib going down
RIB_ARCH_MM = 15.0  # posterior ribs arch upwards from the spine ...
RIB_DROP_MM = (28.0, 52.0)  # ... and drop towards the lateral wall (upper -> lower ribs)
N_POSTERIOR_RIBS = 10
N_ANTERIOR_RIBS = 7
LATERAL_DEPTH_RATIO = 0.76  # sagittal (AP) depth / transverse width of the thorax

# Cardiothoracic ratio ranges (heart width / internal thoracic width) as drawn on the image.
NORMAL_CTR = (0.38, 0.48)
CARDIOMEGALY_CTR = (0.53, 0.66)
CTR_THRESHOLD = 0.5
AP_HEART_MAGNIFICATION = (1.10, 1.15)  # the heart is far from the detector on an AP film
# True (PA-equivalent) ratios drawn on AP films before magnification; the projected ratio is
# then clipped into NORMAL_CTR / CARDIOMEGALY_CTR so the label rule (CTR > 0.5) still holds.
AP_TRUE_NORMAL_CTR = (0.35, 0.425)
AP_TRUE_CARDIOMEGALY_CTR = (0.49, 0.60)

NODULE_DIAMETER_MM = (10.0, 26.0)  # Fleischner: a nodule is < 3 cm
MASS_DIAMETER_MM = (34.0, 72.0)  # a mass is > 3 cm

# Attenuation units: 1.0 ~ the full soft-tissue thickness of the mid-chest.
LUNG_AIR = 0.60  # attenuation removed by a full-depth lung
HEART_DENSITY = 0.015  # tiny: the cardiac outline is where heart meets aerated lung
RIB_DENSITY = 0.085
VESSEL_SAMPLE_MM = 1.0  # spacing of the points that draw a vessel
CLAVICLE_DENSITY = 0.13
SPINE_DENSITY = 0.07
VESSEL_DENSITY = 0.11
ATTENUATION_KAPPA = 2.6  # detector counts fall as exp(-kappa * attenuation)
REFERENCE_COUNTS = 30000.0  # photons per 1.6 mm pixel behind air-free tissue of 0 thickness
REFERENCE_SPACING_MM = 1.6
