"""Data: fetching sources, parsing MedQuAD, text normalisation, the leakage-free split, stratified samples."""
