"""Outputs on a real small file system (a tmpfs mounted by the test): a full disk, a read-only or a
vanished folder gives one line and exit 2, and never a cut-off file under the final name; the mask
is written first and kept whatever happens to the extras; Ctrl-C keeps what was finished."""
import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from MedSAMAgentLib.cli import main
from MedSAMAgentLib.durable import DurableAppender, OutputError, interrupts_deferred, write_json
from MedSAMAgentLib.image_io import LoadedImage, save_mask

from conftest import synthetic_case, write_volume


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> bool:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return len(lines) == 1 and "Traceback" not in err


@pytest.fixture()
def small_disk(tmp_path):
    """A 96 KB tmpfs mounted for the test (root only; skipped, with the reason, where the OS refuses)."""
    point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(point)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'not root'})")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


def fill(disk: Path, leave: int = 2048) -> None:
    """Fills ``disk`` up to ``leave`` bytes."""
    with open(disk / "filler", "wb", buffering=0) as fh:
        try:
            while fh.write(b"x" * 4096):
                pass
        except OSError:
            pass
    size = (disk / "filler").stat().st_size
    os.truncate(disk / "filler", max(0, size - leave))


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name != "filler")


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha", ".png"])
def test_a_full_disk_leaves_no_cut_off_mask(tmp_path, capsys, small_disk, ending):
    if ending == ".png":
        gray, ref = synthetic_case(3, size=(300, 280))
        Image.fromarray(gray).save(tmp_path / "in.png")
        Image.fromarray(ref.astype(np.uint8) * 255).save(tmp_path / "ref.png")
        source, reference, noise = tmp_path / "in.png", tmp_path / "ref.png", []
    else:
        write_volume(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz", n=12)
        source, reference, noise = tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz", ["--label", "3"]
    engine = ["--policy", "expert", "--tool", "classical", "--reference", reference, *noise, "-q"]
    fill(small_disk, leave=600)
    out = small_disk / f"mask{ending}"
    rc, _, err = run(capsys, "segment", source, "--target", "blob", "-o", out, *engine)
    assert rc == 2 and one_line(err) and str(out) in err and "disk is full" in err, err
    assert leftovers(small_disk) == []  # nothing under the final name, no temporary file either
    os.remove(small_disk / "filler")
    rc, _, err = run(capsys, "segment", source, "--target", "blob", "-o", out, *engine)
    assert rc == 0 and sitk.ReadImage(str(out)).GetSize()  # with room, the same command writes it whole


def test_the_library_that_cuts_a_nii_gz_short_in_silence_is_caught(small_disk):
    """SimpleITK writes a truncated .nii.gz on a full disk and says nothing: the read-back catches it."""
    mask = np.random.default_rng(0).random((30, 120, 120)) > 0.5
    like = LoadedImage(sitk.GetImageFromArray(mask.astype(np.int16)), 3, mask.astype(np.int16), "x")
    fill(small_disk, leave=20000)
    sitk.WriteImage(sitk.GetImageFromArray(mask.astype(np.uint8)), str(small_disk / "raw.nii.gz"), True)
    assert (small_disk / "raw.nii.gz").exists()  # the library "succeeded"...
    (small_disk / "raw.nii.gz").unlink()
    with pytest.raises(OutputError, match="disk is full"):
        save_mask(mask, like, small_disk / "m.nii.gz")  # ...ours does not
    assert leftovers(small_disk) == []


def test_read_only_and_vanished_folders(tmp_path, capsys, small_disk):
    write_volume(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        rc, _, err = run(capsys, "segment", tmp_path / "ct.nii.gz", "--target", "blob", "-o", small_disk / "m.nii.gz",
                         "--policy", "expert", "--tool", "classical", "--reference", tmp_path / "lab.nii.gz", "-q")
        assert rc == 2 and one_line(err) and "m.nii.gz" in err, err
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    mask = np.ones((9, 48, 64), bool)
    like = LoadedImage(sitk.ReadImage(str(tmp_path / "ct.nii.gz")), 3, mask, "x")
    with pytest.raises(OutputError, match="folder no longer exists"):
        save_mask(mask, like, small_disk / "gone" / "m.nii.gz", make_folder=False)
    with pytest.raises(OutputError, match="disk is full"):
        fill(small_disk, leave=100)
        write_json(small_disk / "results.json", {"x": list(range(5000))}, "the results")
    assert leftovers(small_disk) == []


def test_an_appended_log_never_ends_in_half_a_line(small_disk):
    log = small_disk / "records.jsonl"
    with DurableAppender(log, "the evaluation records") as records:
        records.append(json.dumps({"n": 1}))
        fill(small_disk, leave=30)
        with pytest.raises(OutputError, match="lines written before are kept"):
            records.append(json.dumps({"n": 2, "pad": "y" * 5000}))
    assert log.read_text() == '{"n": 1}\n'
    os.remove(small_disk / "filler")
    with open(log, "a") as fh:
        fh.write('{"n": 3, "cut')  # a crash mid-line before this class
    DurableAppender(log, "the evaluation records").close()
    assert log.read_text() == '{"n": 1}\n'


def test_the_mask_is_written_first_and_kept_when_an_extra_fails(tmp_path, capsys, small_disk):
    write_volume(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz")
    out = tmp_path / "m.nii.gz"
    rc, _, err = run(capsys, "segment", tmp_path / "ct.nii.gz", "--target", "blob", "-o", out,
                     "--trajectory", small_disk / "t.json", "--policy", "expert", "--tool", "classical",
                     "--reference", tmp_path / "lab.nii.gz", "--label", "3", "--overlays", small_disk / "ov", "-q",
                     "--slices", "2:6")
    assert rc == 2 and one_line(err) and "Kept:" in err and str(out) in err, err
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out))).any()  # the mask is whole
    pictures = list((small_disk / "ov").glob("*.png")) if (small_disk / "ov").exists() else []
    for p in pictures:  # the overlays written before the disk filled are whole pictures
        Image.open(p).load()
    assert not [p for p in small_disk.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_ctrl_c_while_overlays_are_written_keeps_the_mask_and_the_finished_overlays(tmp_path, capsys, monkeypatch):
    import MedSAMAgentLib.overlays as overlays

    write_volume(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz")
    real, calls = overlays.write_turn_pngs, []

    def interrupted_on_the_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(overlays, "write_turn_pngs", interrupted_on_the_third)
    out = tmp_path / "m.nii.gz"
    rc, _, err = run(capsys, "segment", tmp_path / "ct.nii.gz", "--target", "blob", "-o", out, "--overlays",
                     tmp_path / "ov", "--trajectory", tmp_path / "t.json", "--policy", "expert", "--tool", "classical",
                     "--reference", tmp_path / "lab.nii.gz", "--label", "3", "-q")
    assert rc == 130 and "interrupted while writing the extras" in err and str(out) in err, err
    assert out.exists() and (tmp_path / "t.json").exists() and not Path(str(out).replace(".nii", ".partial.nii")).exists()
    assert len({p.name.split("_turn")[0] for p in (tmp_path / "ov").glob("*.png")}) == 2  # two slices' overlays


def test_ctrl_c_waits_for_the_mask_being_written(tmp_path):
    """A real SIGINT during the deferred block is delivered once it ends, not in the middle."""
    order = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            order.append("still writing")
    assert order == ["still writing"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_stopped_run_keeps_its_finished_slices_and_their_overlays(tmp_path, capsys, monkeypatch):
    import MedSAMAgentLib.agent as agent_module

    write_volume(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz", n=12)
    real, batches = agent_module.Agent.run, []

    def stop_at_the_second_batch(self, episodes):
        batches.append(len(episodes))
        if len(batches) == 2:
            raise KeyboardInterrupt
        return real(self, episodes)

    monkeypatch.setattr(agent_module.Agent, "run", stop_at_the_second_batch)
    rc, _, err = run(capsys, "segment", tmp_path / "ct.nii.gz", "--target", "blob", "-o", tmp_path / "m.nii.gz",
                     "--overlays", tmp_path / "ov", "--policy", "expert", "--tool", "classical", "--batch-size", "4",
                     "--reference", tmp_path / "lab.nii.gz", "--label", "3", "-q")
    assert rc == 130 and "after 4 finished slice(s)" in err and "m.partial.nii.gz" in err, err
    assert not (tmp_path / "m.nii.gz").exists() and (tmp_path / "m.partial.nii.gz").exists()
    assert len({p.name.split("_turn")[0] for p in (tmp_path / "ov").glob("*.png")}) == 4
