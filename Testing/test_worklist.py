"""The review worklist of a label output folder (pure Python, no Slicer): the QC report's review list first in
its order, then the rest by case id; next/previous wrap; an accepted case loads from its review copies."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from MedSAMAgentLib.image_io import InputError, load_image
from MedSAMAgentLib.slicer_support.worklist import Worklist


def label_folder(root, cases, review=()):
    """A label output with ``cases`` (ids) on a small volume; ``review``: the report's list (folder, reason)."""
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    sitk.WriteImage(image, str(root / "image.nii.gz"))
    (root / "label.json").write_text("{}")
    for case in cases:
        folder = root / "cases" / case
        folder.mkdir(parents=True)
        mask = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8))
        sitk.WriteImage(mask, str(folder / "liver.nii.gz"))
        (folder / "audit.json").write_text('{"format": "medsam-agent-audit", "version": 1, "runs": []}')
        (folder / "case.json").write_text(json.dumps({
            "case": case, "image": str(root / "image.nii.gz"), "series": None, "dicom": False, "dim": 3,
            "axis": "axial", "targets": {"liver": {"file": "liver.nii.gz", "text": "liver"}}}))
    (root / "report.json").write_text(json.dumps({"review": [{"case": f, "folder": f, "reasons": [why]}
                                                             for f, why in review]}))
    return root


def test_review_listed_cases_come_first_in_the_reports_order_then_the_rest_by_id(tmp_path):
    folder = label_folder(tmp_path, ["a", "b", "c", "d"], review=[("c", "liver: 2 jumps"), ("b", "liver: empty")])
    worklist = Worklist(folder)
    assert [it.case for it in worklist.items] == ["c", "b", "a", "d"]
    assert worklist.current.reasons == ["liver: 2 jumps"] and worklist.items[2].reasons == []
    assert "worth a look: liver: 2 jumps" in worklist.status_text()


def test_next_and_previous_wrap(tmp_path):
    worklist = Worklist(label_folder(tmp_path, ["a", "b"]))
    assert [worklist.next().case, worklist.next().case, worklist.previous().case] == ["b", "a", "b"]
    (tmp_path / "one").mkdir()
    single = Worklist(label_folder(tmp_path / "one", ["x"]))
    assert single.next().case == "x" and single.previous().case == "x" and single.index == 0


def test_an_accepted_case_loads_from_its_review_copies(tmp_path):
    worklist = Worklist(label_folder(tmp_path, ["a"]))
    it = worklist.current
    assert worklist.sources() == ({"liver": it.masks["liver"]}, it.audit)
    mask = np.zeros((4, 5, 6), bool)
    mask[1, 2, 3] = True
    worklist.accept({"liver": mask}, '{"format": "medsam-agent-audit", "version": 1, "runs": []}',
                    load_image(it.image))
    masks, audit = Worklist(tmp_path).sources()
    assert masks["liver"] == tmp_path / "review" / "a" / "liver.nii.gz"
    assert audit == tmp_path / "review" / "a" / "audit.json"
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(masks["liver"]))).astype(bool), mask)
    with pytest.raises(ValueError):
        worklist.accept({"kidney": mask}, "{}", load_image(it.image))


def test_a_folder_that_is_not_a_label_output_is_refused(tmp_path):
    with pytest.raises(InputError, match="not a 'medsam-agent label' output folder"):
        Worklist(tmp_path)
