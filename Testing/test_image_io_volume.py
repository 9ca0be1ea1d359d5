"""Reading and writing images through SimpleITK; slicing volumes in patient orientation."""
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from MedSAMAgentLib.image_io import InputError, load_image, load_mask, save_mask
from MedSAMAgentLib.volume import OrientedVolume, parse_slices

OBLIQUE = (0.0, 0.0, -1.0, 0.9659258, -0.258819, 0.0, 0.258819, 0.9659258, 0.0)  # PSR-like, rotated 15 degrees


def make_volume(path, shape=(12, 20, 16), direction=OBLIQUE, dtype=np.int16, spacing=(0.8, 0.9, 2.5)):
    rng = np.random.default_rng(0)
    arr = rng.integers(-100, 300, shape).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((10.0, -20.0, 35.5))
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return img, arr


def same_geometry(a, b):
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_volume_masks_keep_the_exact_geometry(tmp_path, suffix):
    img, arr = make_volume(tmp_path / f"in{suffix}")
    loaded = load_image(tmp_path / f"in{suffix}")
    assert loaded.dim == 3 and loaded.array.shape == arr.shape
    mask = arr > 100
    out = save_mask(mask, loaded, tmp_path / "sub" / f"mask{suffix}")
    back = sitk.ReadImage(str(out))
    assert same_geometry(back, img)
    assert np.array_equal(sitk.GetArrayFromImage(back).astype(bool), mask)


def test_2d_png_gray_and_rgb(tmp_path):
    gray = np.random.default_rng(1).integers(0, 255, (30, 40), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(np.dstack([gray] * 3)).save(tmp_path / "c.jpg" if False else tmp_path / "c.png")
    g, c = load_image(tmp_path / "g.png"), load_image(tmp_path / "c.png")
    assert g.dim == 2 and g.array.shape == (30, 40) and c.array.shape == (30, 40, 3) and c.is_rgb
    out = save_mask(gray > 128, g, tmp_path / "m.png")
    back = np.asarray(Image.open(out))
    assert back.shape == (30, 40) and set(np.unique(back)) <= {0, 255}
    assert np.array_equal(back > 127, gray > 128)


def test_pictures_simpleitk_cannot_read_are_read_with_pillow(tmp_path):
    """Gray with an alpha channel and palette PNGs (common exports of viewers and slides)."""
    gray = (np.arange(48 * 64).reshape(48, 64) % 251).astype(np.uint8)
    Image.fromarray(np.dstack([gray, np.full_like(gray, 255)]), "LA").save(tmp_path / "la.png")
    with pytest.raises(RuntimeError):
        sitk.ReadImage(str(tmp_path / "la.png"))  # why the fallback exists
    loaded = load_image(tmp_path / "la.png")
    assert loaded.dim == 2 and np.array_equal(loaded.array, gray)
    Image.fromarray(gray).convert("P").save(tmp_path / "p.png")
    palette = load_image(tmp_path / "p.png")
    assert palette.array.shape == (48, 64, 3) and palette.array.dtype == np.uint8
    mask = np.zeros((48, 64), bool)
    mask[10:20, 5:30] = True
    Image.fromarray(np.dstack([mask.astype(np.uint8) * 255, np.full_like(gray, 255)]), "LA").save(tmp_path / "m.png")
    assert np.array_equal(load_mask(tmp_path / "m.png", like=loaded), mask)
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    with pytest.raises(InputError, match="Cannot read"):
        load_image(tmp_path / "bad.png")


def test_dicom_series_folder(tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    arr = (np.arange(4 * 16 * 18).reshape(4, 16, 18) % 500).astype(np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep our series UID on every slice
    for k in range(4):
        sl = sitk.GetImageFromArray(arr[k:k + 1])
        sl.SetSpacing((0.7, 0.7, 3.0))
        for tag, value in {"0008|0060": "CT", "0020|000e": "1.2.826.0.1.3680043.2.1125.1", "0020|000d": "1.2.3",
                           "0020|0013": str(k + 1), "0020|0032": f"0\\0\\{3.0 * k}",
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "0.7\\0.7",
                           "0008|0018": f"1.2.826.0.1.3680043.2.1125.2.{k + 1}"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"s{k}.dcm"))
        writer.Execute(sl)
    loaded = load_image(folder)
    assert loaded.dim == 3 and loaded.array.shape == (4, 16, 18) and loaded.series
    assert np.array_equal(loaded.array, arr)
    with pytest.raises(InputError, match="No DICOM series"):
        load_image(tmp_path)


def test_bad_inputs_say_what_is_wrong(tmp_path):
    with pytest.raises(InputError, match="No such file"):
        load_image(tmp_path / "missing.nii.gz")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="Unsupported file type"):
        load_image(tmp_path / "x.txt")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(InputError, match="Cannot read"):
        load_image(tmp_path / "broken.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 8, 8), np.float32) + np.arange(8), isVector=False),
                    str(tmp_path / "t.nii.gz"))
    with pytest.raises(InputError, match="4D"):
        load_image(tmp_path / "t.nii.gz")
    vec = sitk.GetImageFromArray(np.random.default_rng(0).random((4, 8, 8, 3)).astype(np.float32), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "v.nrrd"))
    with pytest.raises(InputError, match="vector volume"):
        load_image(tmp_path / "v.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 8, 8), 7, np.int16)), str(tmp_path / "c.nii.gz"))
    with pytest.raises(InputError, match="constant"):
        load_image(tmp_path / "c.nii.gz")
    nan = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    nan[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(tmp_path / "n.mha"))  # (ITK turns NaN into 0 in NIfTI)
    with pytest.raises(InputError, match="NaN"):
        load_image(tmp_path / "n.mha")


def test_mask_geometry_is_checked(tmp_path):
    make_volume(tmp_path / "img.nii.gz")
    make_volume(tmp_path / "other.nii.gz", spacing=(1.0, 1.0, 1.0))
    make_volume(tmp_path / "small.nii.gz", shape=(12, 20, 15))
    loaded = load_image(tmp_path / "img.nii.gz")
    with pytest.raises(InputError, match="spacing"):
        load_mask(tmp_path / "other.nii.gz", like=loaded)
    with pytest.raises(InputError, match="16x20x12"):
        load_mask(tmp_path / "small.nii.gz", like=loaded)
    m = load_mask(tmp_path / "img.nii.gz", [5, 6], like=loaded)
    assert m.dtype == bool and np.array_equal(m, np.isin(loaded.array, [5, 6]))


def test_slices_are_shown_in_patient_orientation_whatever_the_direction(tmp_path):
    # a volume stored sagittally (PSR) with a bright voxel that is superior, anterior and on the patient's right
    img, _ = make_volume(tmp_path / "v.nii.gz", direction=(0, 0, -1, 1, 0, 0, 0, 1, 0), spacing=(1, 1, 1))
    arr = np.zeros(sitk.GetArrayFromImage(img).shape, np.int16)
    marker = sitk.GetImageFromArray(arr)
    marker.CopyInformation(img)
    corners = [marker.TransformIndexToPhysicalPoint((i, j, k)) for i in (0, 15) for j in (0, 19) for k in (0, 11)]
    # LPS: right = smallest x, anterior = smallest y, superior = largest z
    target = min(corners, key=lambda p: p[0] - p[2] + p[1])
    idx = marker.TransformPhysicalPointToIndex(target)
    marker[idx] = 1000
    vol = OrientedVolume(marker)
    assert vol.orientation == "PSR" and np.allclose(vol.lps.GetDirection(), np.eye(3).ravel())
    ax = vol.slice("axial", vol.num_slices("axial") - 1)  # the most superior axial slice
    assert ax[0, 0] == 1000  # anterior at the top, patient's right on the left
    assert vol.slice("coronal", 0)[0, 0] == 1000  # superior at the top, right on the left
    assert vol.slice("sagittal", 0)[0, 0] == 1000  # superior at the top, anterior on the left
    # masks go back into the file's voxel order exactly
    lps = vol.empty_mask()
    for axis in ("axial", "coronal", "sagittal"):
        m = np.zeros_like(vol.slice(axis, 1), dtype=bool)
        m[0, 1] = True
        vol.put_slice(lps, axis, 1, m)
        assert np.array_equal(vol.slice(axis, 1, lps), m)
    original = vol.to_original(lps)
    assert original.shape == sitk.GetArrayFromImage(marker).shape
    assert np.array_equal(vol.from_original(original), lps)
    # a volume already in LPS is not copied (a CT series usually is): its voxels are kept once
    already = OrientedVolume(vol.lps)
    assert already.lps is vol.lps and np.shares_memory(already.array, vol.array)
    assert np.array_equal(already.from_original(lps), lps)


def test_parse_slices():
    assert parse_slices("all", 10) == ("range", range(0, 10))
    assert parse_slices("2:5", 10) == ("range", range(2, 5))
    assert parse_slices(":3", 10) == ("range", range(0, 3))
    assert parse_slices("7", 10) == ("range", range(7, 8))
    assert parse_slices("auto", 10) == ("auto", None)
    for bad in ("5:20", "-1:3", "4:4", "x", "1:b"):
        with pytest.raises(ValueError):
            parse_slices(bad, 10)
    for backwards in ("5:2", "4:4"):  # said as what it is, not as "outside the volume"
        with pytest.raises(ValueError, match="B must be greater than A"):
            parse_slices(backwards, 10)


def test_a_cut_off_or_oversized_file_is_refused_before_it_is_segmented(tmp_path, monkeypatch):
    """ITK reads a cut-off .nii.gz without a word (the missing voxels become 0): refused instead;
    and a volume too large to hold is refused from its header, before its voxels are read."""
    import MedSAMAgentLib.image_io as image_io

    rng = np.random.default_rng(0)
    sitk.WriteImage(sitk.GetImageFromArray(rng.normal(0, 100, (12, 64, 64)).astype(np.int16)), str(tmp_path / "v.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray((rng.random((12, 64, 64)) > 0.5).astype(np.uint8)), str(tmp_path / "m.nii.gz"))
    whole = load_image(tmp_path / "v.nii.gz")
    assert load_mask(tmp_path / "m.nii.gz", like=whole).shape == (12, 64, 64)
    for name in ("v", "m"):
        data = (tmp_path / f"{name}.nii.gz").read_bytes()
        (tmp_path / f"{name}_cut.nii.gz").write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(InputError, match="incomplete or corrupt"):
        load_image(tmp_path / "v_cut.nii.gz")
    with pytest.raises(InputError, match="incomplete or corrupt"):
        load_mask(tmp_path / "m_cut.nii.gz")
    monkeypatch.setattr(image_io, "MAX_VOXELS", 12 * 64 * 64 - 1)
    with pytest.raises(InputError, match="voxels, more than"):
        load_image(tmp_path / "v.nii.gz")


def test_a_single_slice_along_the_chosen_axis_says_which_axis_to_use(tmp_path):
    from MedSAMAgentLib.agent import Agent
    from MedSAMAgentLib.image_io import load_image
    from MedSAMAgentLib.policies import create_policy
    from MedSAMAgentLib.profile import Profile
    from MedSAMAgentLib.segment import SegmentOptions, segment
    from MedSAMAgentLib.tools import create_tool

    arr = (np.random.default_rng(0).random((1, 40, 50)) * 200).astype(np.int16)  # one axial slice
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "one.nii.gz"))
    loaded = load_image(tmp_path / "one.nii.gz")
    agent = Agent(create_policy("replay", actions=[]), create_tool("classical"), Profile.load())
    with pytest.raises(ValueError, match="Use --axis axial"):
        segment(loaded, "x", agent, SegmentOptions(axis="coronal"))
