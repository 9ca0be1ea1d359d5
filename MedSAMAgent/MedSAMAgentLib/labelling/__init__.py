"""Labelling whole datasets: the cases of a source (:mod:`sources`), the run with resume and
shards (:mod:`run`), its quality report (:mod:`qc`) and DICOM SEG output (:mod:`dicom_seg`)."""
