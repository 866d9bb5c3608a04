"""Quantitative features of regions of radiographs, through PyRadiomics (the
``pyradiomics-bhklab`` build, which imports as ``radiomics``). ``features`` measures one
region; the batch loop of ``cxrtool radiomics`` builds on it."""
