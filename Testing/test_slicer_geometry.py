"""Slicer-side geometry against the worker's own reader: IJK <-> RAS, slice images, grid, ROIs, masks, NRRD.

The reference is what the worker does: it reads the file the module writes
(SimpleITK) and cuts it with ``OrientedVolume``.  Every volume here is written
with ``write_nrrd`` and read back that way, for plain, permuted/flipped and
oblique direction matrices.
"""
import numpy as np
import pytest
import SimpleITK as sitk

from MedSAMAgentLib.grid import GRID_MAX
from MedSAMAgentLib.slicer_support.geometry import AXES, VolumeGeometry, lps_axes
from MedSAMAgentLib.slicer_support.volume_file import write_nrrd
from MedSAMAgentLib.volume import OrientedVolume

from conftest import rotation


def ijk_to_ras(direction: np.ndarray, spacing=(0.8, 1.1, 2.5), origin=(12.0, -30.0, 45.0)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, float) * np.asarray(spacing)
    m[:3, 3] = origin
    return m


DIRECTIONS = {
    # Slicer's usual axial volume: I towards L, J towards P (the DICOM/LPS layout, as RAS columns)
    "lps": np.diag([-1.0, -1.0, 1.0]),
    "ras": np.eye(3),
    # a sagittal acquisition: I along A->P, J along S->I, K along R->L
    "sagittal": np.array([[0, 0, -1], [-1, 0, 0], [0, -1, 0]], float),
    "oblique-20": rotation(0, 20) @ rotation(2, -12) @ np.diag([-1.0, -1.0, 1.0]),
    "oblique-38": rotation(1, 38) @ np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]], float),
}


@pytest.fixture(params=sorted(DIRECTIONS))
def volume(request, tmp_path):
    """(geometry, KJI array of unique voxel ids, the worker's OrientedVolume, the SimpleITK image)."""
    m = ijk_to_ras(DIRECTIONS[request.param])
    dims = (7, 5, 4)  # ni, nj, nk
    kji = np.arange(np.prod(dims)).reshape(dims[::-1]).astype(np.int32)
    path = write_nrrd(tmp_path / "v.nrrd", kji, m)
    image = sitk.ReadImage(str(path))
    return VolumeGeometry(m, dims), kji, OrientedVolume(image), image


def ras_of_voxel(image, kji_shape, voxel_id):
    k, j, i = np.unravel_index(int(voxel_id), kji_shape)
    x, y, z = image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
    return np.array([-x, -y, z])  # LPS -> RAS


def test_slices_are_the_workers_slices_for_every_axis(volume):
    geometry, kji, worker, _ = volume
    assert geometry.orientation == worker.orientation
    for axis in AXES:
        assert geometry.num_slices(axis) == worker.num_slices(axis)
        for index in range(geometry.num_slices(axis)):
            want = worker.slice(axis, index)
            assert geometry.slice_shape(axis) == want.shape
            assert np.array_equal(geometry.read_slice(kji, axis, index), want)


def test_pixel_to_ras_is_where_the_worker_pixel_lies(volume):
    geometry, kji, worker, image = volume
    for axis in AXES:
        for index in (0, geometry.num_slices(axis) - 1):
            pixels = worker.slice(axis, index)
            h, w = pixels.shape
            for x, y in ((0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1), (w // 2, h // 2)):
                want = ras_of_voxel(image, kji.shape, pixels[y, x])
                assert np.allclose(geometry.pixel_to_ras(axis, index, x, y), want, atol=1e-6), (axis, index, x, y)


def test_ijk_ras_and_pixel_round_trips(volume):
    geometry, *_ = volume
    rng = np.random.default_rng(1)
    ijk = rng.uniform(-1, 6, (20, 3))
    assert np.allclose(geometry.ras_to_ijk_points(geometry.ijk_to_ras_points(ijk)), ijk)
    for axis in AXES:
        h, w = geometry.slice_shape(axis)
        for _ in range(10):
            index = int(rng.integers(0, geometry.num_slices(axis)))
            x, y = rng.uniform(-0.5, w - 0.5), rng.uniform(-0.5, h - 0.5)
            ras = geometry.pixel_to_ras(axis, index, x, y)
            back = geometry.ras_to_pixel(axis, ras)
            assert np.allclose(back, (x, y, index), atol=1e-9)
            assert geometry.slice_index_at(axis, ras) == index


def test_grid_pixels_ras_round_trip(volume):
    geometry, *_ = volume
    for axis in AXES:
        h, w = geometry.slice_shape(axis)
        for gx, gy in ((0, 0), (GRID_MAX, GRID_MAX), (250, 750), (500, 1)):
            index = geometry.num_slices(axis) - 1
            ras = geometry.grid_to_ras(axis, index, gx, gy)
            assert geometry.ras_to_grid(axis, ras) == (gx, gy, index)
        # grid 0 and 999 are the centres of the first and last pixels
        assert geometry.grid_to_pixel(axis, 0, GRID_MAX) == (0.0, h - 1)
        assert geometry.grid_to_pixel(axis, GRID_MAX, 0) == (w - 1, 0.0)


def test_a_box_becomes_an_roi_in_its_slice_plane_and_back(volume):
    geometry, *_ = volume
    for axis in AXES:
        h, w = geometry.slice_shape(axis)
        index = geometry.num_slices(axis) // 2
        box = (0.5, 1.0, w - 1.5, h - 1.0)
        obj, size = geometry.box_to_roi(axis, index, box)
        axes = obj[:3, :3]
        assert np.allclose(axes.T @ axes, np.eye(3), atol=1e-9) and np.linalg.det(axes) > 0  # a rotation
        assert np.allclose(axes[:, 2], np.cross(axes[:, 0], axes[:, 1]))
        # the ROI's normal is the slice normal, its centre is on slice `index`, it is one slice thick
        assert abs(abs(axes[:, 2] @ geometry.normal_ras(axis)) - 1) < 1e-9
        _, _, z = geometry.ras_to_pixel(axis, obj[:3, 3])
        assert z == pytest.approx(index)
        sx, sy, sz = geometry.pixel_size(axis)
        assert np.allclose(size, [(box[2] - box[0]) * sx, (box[3] - box[1]) * sy, sz])
        back_index, back_box = geometry.roi_to_box(axis, obj, size)
        assert back_index == index and np.allclose(back_box, box)


def test_a_rotated_roi_gives_its_bounding_box():
    geometry = VolumeGeometry(ijk_to_ras(np.eye(3), spacing=(1, 1, 1)), (20, 20, 5))
    obj, size = geometry.box_to_roi("axial", 2, (5, 8, 15, 12))  # 10 x 4 pixels, centre (10, 10)
    turn = np.eye(4)
    turn[:3, :3] = rotation(2, 90)  # a quarter turn in the slice plane
    rotated = obj.copy()
    rotated[:3, :3] = turn[:3, :3] @ obj[:3, :3]
    index, box = geometry.roi_to_box("axial", rotated, size)
    assert index == 2 and np.allclose(box, (8, 5, 12, 15))


def slice_to_ras(x, y, centre=(0, 0, 0)):
    """A slice view's SliceToRAS: columns x, y, normal (x cross y), centre."""
    m = np.eye(4)
    m[:3, 0], m[:3, 1] = x, y
    m[:3, 2] = np.cross(x, y)
    m[:3, 3] = centre
    return m


RED = slice_to_ras((-1, 0, 0), (0, 1, 0))  # Slicer's axial view
GREEN = slice_to_ras((-1, 0, 0), (0, 0, 1))  # coronal
YELLOW = slice_to_ras((0, -1, 0), (0, 0, 1))  # sagittal


def test_each_slice_view_picks_its_axis_even_for_oblique_volumes():
    for name, direction in DIRECTIONS.items():
        geometry = VolumeGeometry(ijk_to_ras(direction), (7, 5, 4))
        assert geometry.axis_for_view(RED) == "axial", name
        assert geometry.axis_for_view(GREEN) == "coronal", name
        assert geometry.axis_for_view(YELLOW) == "sagittal", name
    tilted = slice_to_ras(rotation(1, 25)[:, 0] * -1, (0, 1, 0))  # an axial view tilted by 25 degrees
    geometry = VolumeGeometry(ijk_to_ras(DIRECTIONS["lps"]), (7, 5, 4))
    assert geometry.axis_for_view(tilted) == "axial"
    assert geometry.view_tilt_degrees(tilted, "axial") == pytest.approx(25)
    assert geometry.view_tilt_degrees(RED, "axial") == pytest.approx(0, abs=1e-6)


def test_the_current_slice_is_the_one_through_the_view_centre(volume):
    geometry, *_ = volume
    for axis, view in (("axial", RED), ("coronal", GREEN), ("sagittal", YELLOW)):
        for index in range(geometry.num_slices(axis)):
            h, w = geometry.slice_shape(axis)
            m = view.copy()
            m[:3, 3] = geometry.pixel_to_ras(axis, index, (w - 1) / 2, (h - 1) / 2)
            assert geometry.view_slice_index(m, axis) == index
        far = view.copy()
        far[:3, 3] = geometry.pixel_to_ras(axis, geometry.num_slices(axis) + 30, 0, 0)
        assert geometry.view_slice_index(far, axis) == geometry.num_slices(axis) - 1  # clamped


def test_a_slice_mask_is_written_into_exactly_that_slice(volume):
    geometry, kji, worker, _ = volume
    rng = np.random.default_rng(2)
    for axis in AXES:
        index = geometry.num_slices(axis) - 2
        mask = rng.random(geometry.slice_shape(axis)) > 0.5
        extent, block = geometry.mask_block(axis, index, mask)
        thickness = [extent[1] - extent[0], extent[3] - extent[2], extent[5] - extent[4]]
        assert sorted(thickness)[0] == 0  # one voxel thick along the cut axis
        seg = np.zeros(kji.shape, np.uint8)
        i0, i1, j0, j1, k0, k1 = extent
        seg[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = block
        assert seg.sum() == mask.sum()
        assert np.array_equal(geometry.read_slice(seg, axis, index).astype(bool), mask)
        # the worker's own put_slice agrees (in its LPS array, mapped back to the file's voxel order)
        lps = worker.empty_mask()
        worker.put_slice(lps, axis, index, mask)
        assert np.array_equal(worker.to_original(lps), seg.astype(bool))
        other = np.zeros(kji.shape, np.uint8)
        geometry.write_slice(other, axis, index, mask)
        assert np.array_equal(other, seg)
        assert np.array_equal(geometry.block_to_mask(axis, index, extent, block), mask)
    with pytest.raises(ValueError, match="must be"):
        geometry.mask_block("axial", 0, np.zeros((2, 2), bool))
    with pytest.raises(IndexError, match="outside"):
        geometry.slice_extent("axial", geometry.num_slices("axial"))


def test_itk_orientation_rule_pairs_axes_greedily():
    # 45 degrees between I and J: both lean equally; ITK's rule still gives a permutation
    m = ijk_to_ras(rotation(2, 45) @ DIRECTIONS["lps"])
    physical, signs = lps_axes(m)
    assert sorted(physical) == [0, 1, 2]
    with pytest.raises(ValueError, match="singular"):
        VolumeGeometry(np.diag([1.0, 1.0, 0.0, 1.0]), (2, 2, 2))


def test_the_volume_file_keeps_geometry_and_voxels(tmp_path):
    m = ijk_to_ras(DIRECTIONS["oblique-38"], spacing=(0.7, 0.9, 3.0), origin=(-5.0, 7.5, 100.0))
    for dtype in (np.int16, np.uint8, np.float32, np.float64):
        kji = (np.arange(3 * 4 * 5).reshape(3, 4, 5) - 20).astype(dtype)
        path = write_nrrd(tmp_path / f"v-{np.dtype(dtype).name}.nrrd", kji, m)
        image = sitk.ReadImage(str(path))
        assert np.array_equal(sitk.GetArrayFromImage(image), kji)
        assert sitk.GetArrayFromImage(image).dtype == np.dtype(dtype)
        lps = np.diag([-1.0, -1.0, 1.0]) @ m[:3, :3]
        assert np.allclose(image.GetSpacing(), (0.7, 0.9, 3.0))
        assert np.allclose(np.array(image.GetDirection()).reshape(3, 3), lps / np.array([0.7, 0.9, 3.0]))
        assert np.allclose(image.GetOrigin(), (5.0, -7.5, 100.0))
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="scalar 3D"):
        write_nrrd(tmp_path / "rgb.nrrd", np.zeros((2, 3, 4, 3), np.uint8), m)
