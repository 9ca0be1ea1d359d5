"""A volume written as a DICOM series by SimpleITK, for the tests of DICOM input (label, the Slicer worklist)."""
from pathlib import Path

import SimpleITK as sitk


def write_dicom_series(image, folder: Path) -> Path:
    """``image`` as a CT DICOM series (one file per slice, geometry in the standard tags), by SimpleITK."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.Cast(image, sitk.sitkInt16)
    d = img.GetDirection()
    root = "1.2.826.0.1.3680043.8.498"
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        tags = {"0008|0060": "CT", "0020|000d": f"{root}.1", "0020|000e": f"{root}.2", "0020|0052": f"{root}.3",
                "0010|0010": "Test^Case", "0010|0020": "TEST1", "0010|0030": "19700101", "0010|0040": "O",
                "0008|0020": "20260101", "0008|0030": "120000", "0008|0050": "1", "0020|0010": "1",
                "0020|0011": "1", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{root}.2.{k + 1}",
                "0020|0013": str(k + 1), "0008|0070": "test",
                "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                "0020|0032": "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
                "0018|0050": f"{img.GetSpacing()[2]:.6f}"}
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)
    return folder
