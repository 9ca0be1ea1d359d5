"""DICOM SEG output for a DICOM series input, through ``highdicom``.

One SEG instance per case: one binary segment per target, frames referencing the
series' own images (the order SimpleITK read them in, which is the mask's z order).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..image_io import InputError, dicom_series_files


def property_type(name: str):
    """The SNOMED CT code of a target named in words ("liver", "left kidney" -> Kidney), else Tissue."""
    from pydicom.sr.codedict import codes

    words = [w.capitalize() for w in name.replace("_", " ").split()]
    for candidate in ("".join(words), "".join(w for w in words if w not in ("Left", "Right"))):
        code = getattr(codes.SCT, candidate, None) if candidate else None
        if code is not None:
            return code
    return codes.SCT.Tissue


def write_seg(folder: Path, series: str | None, masks: dict, path: Path, version: str = "0.1") -> Path:
    """Write ``masks`` ({target name: bool [z, y, x] in the series' read order}) as a DICOM SEG at ``path``."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from ..durable import atomic_output

    sources = [pydicom.dcmread(f) for f in dicom_series_files(folder, series)]
    names = list(masks)
    stack = np.stack([np.asarray(masks[n], bool) for n in names], axis=-1)  # [z, y, x, segment]
    if stack.shape[:3] != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise ValueError(f"The masks {stack.shape[:3]} do not match the series ({len(sources)} x "
                         f"{sources[0].Rows} x {sources[0].Columns}).")
    algorithm = hd.AlgorithmIdentificationSequence(name="MedSAM Agent", version=version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=name[:64],
        segmented_property_category=codes.SCT.AnatomicalStructure, segmented_property_type=property_type(name),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC, algorithm_identification=algorithm)
        for i, name in enumerate(names)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=stack, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="MedSAM Agent", manufacturer_model_name="medsam-agent",
        software_versions=version, device_serial_number="0", series_description="MedSAM Agent labels",
        omit_empty_frames=False)
    with atomic_output(path, "the DICOM SEG") as tmp:
        seg.save_as(str(tmp))
    return path


def read_seg(path: Path, folder: Path, series: str | None) -> dict:
    """A SEG written by :func:`write_seg` as {segment label: bool [z, y, x]} in the series' read order."""
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(str(path))
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in dicom_series_files(folder, series)]
    out = {}
    for number in seg.segment_numbers:
        label = seg.get_segment_description(number).segment_label
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[number],
                                                   assert_missing_frames_are_empty=True)
        out[label] = np.asarray(pixels[..., 0], bool)
    return out
