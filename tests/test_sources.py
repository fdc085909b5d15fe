"""Data sources: official batches, image folders, .tar.gz and .zip give the same arrays; the decode
cache; class order; every bad input is one line that names the file and the fix, and nothing
half-written is used."""
from __future__ import annotations

import io
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from common.data import cache, folders, sources
from common.errors import UserError
from conftest import PHOTOS, make_cifar_dir, one_line_error, run_cli


def image_folder(root: Path, names=None, n_test: int = 5) -> Path:
    """train/<class>/ and test/<class>/ of the real PNG photos: the first n_test of each class go to
    test/."""
    for cls_dir in sorted(PHOTOS.iterdir()):
        if not cls_dir.is_dir():
            continue
        name = (names or {}).get(cls_dir.name, cls_dir.name)
        for i, f in enumerate(sorted(cls_dir.glob("*.png"))):
            dest = root / ("test" if i < n_test else "train") / name / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
    return root


def tar_of(folder: Path, dest: Path, top: str | None = "cifar10") -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(folder / split, arcname=f"{top}/{split}" if top else split)
    return dest


def zip_of(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as z:
        for f in sorted(folder.rglob("*.png")):
            z.write(f, f"cifar10/{f.relative_to(folder)}")
    return dest


def test_every_source_kind_gives_the_same_arrays_and_labels(tmp_path):
    folder = image_folder(tmp_path / "folder")
    from_folder = sources.open_source(folder)
    assert from_folder.kind == "image-folder" and from_folder.classes == folders.CIFAR_CLASSES
    assert len(from_folder.train_x) == 150 and len(from_folder.test_x) == 50
    batches = sources.write_batches(tmp_path / "official", from_folder.train_x, from_folder.train_y,
                                    from_folder.test_x, from_folder.test_y).parent
    kinds = [("cifar-batches", batches), ("tar", tar_of(folder, tmp_path / "c.tar.gz")),
             ("zip", zip_of(folder, tmp_path / "c.zip")),
             ("tar", tar_of(folder, tmp_path / "no_top_folder.tgz", None))]
    for kind, path in kinds:
        s = sources.open_source(path)
        assert s.kind == kind, path
        for a in ("train_x", "train_y", "test_x", "test_y"):
            assert np.array_equal(getattr(s, a), getattr(from_folder, a)), (kind, a)
        # the content hash does not depend on the format
        assert s.sha256 == from_folder.sha256, kind
    # and the pixels are the photos': the first test airplane is the first airplane file
    from PIL import Image

    first = sorted((PHOTOS / "airplane").glob("*.png"))[0]
    assert np.array_equal(from_folder.test_x[0].transpose(1, 2, 0),
                          np.asarray(Image.open(first).convert("RGB")))


def test_cifar_class_names_in_any_case_keep_the_official_order_others_are_sorted(tmp_path):
    upper = sources.open_source(image_folder(tmp_path / "u",
                                             {c: c.upper() for c in folders.CIFAR_CLASSES}))
    assert upper.classes == tuple(c.upper() for c in folders.CIFAR_CLASSES)
    renamed = {"airplane": "zebra", "automobile": "apple"}
    other = sources.open_source(image_folder(tmp_path / "o", renamed))
    assert other.classes == tuple(sorted(renamed.get(c, c) for c in folders.CIFAR_CLASSES))
    assert other.provenance()["classes"] == list(other.classes)
    # the labels follow the mapping: every 'apple' (the old automobile) image carries apple's index
    base = sources.open_source(image_folder(tmp_path / "b"))
    assert np.array_equal(other.train_x[other.train_y == other.classes.index("apple")],
                          base.train_x[base.train_y == folders.CIFAR_CLASSES.index("automobile")])


def test_the_decode_cache_is_used_then_invalidated_by_a_changed_source(tmp_path, monkeypatch):
    folder = image_folder(tmp_path / "f")
    first = sources.open_source(folder)
    cached = list(tmp_path.glob("f.decoded-*.npz"))
    assert len(cached) == 1, "cached beside the data folder, not inside it"
    monkeypatch.setattr(folders, "decode_entries",
                        lambda *a, **k: pytest.fail("decoded again despite the cache"))
    again = sources.open_source(folder)
    assert np.array_equal(again.train_x, first.train_x) and again.sha256 == first.sha256
    monkeypatch.undo()
    victim = sorted((folder / "train" / "cat").glob("*.png"))[0]
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 0, 0)).save(victim)
    changed = sources.open_source(folder)
    assert changed.sha256 != first.sha256
    assert (changed.train_x
            == np.array([255, 0, 0], np.uint8).reshape(3, 1, 1)).all(axis=(1, 2, 3)).any()


def test_a_read_only_data_folder_caches_under_cache_dir_or_the_user_cache(tmp_path, monkeypatch):
    folder = image_folder(tmp_path / "ro")
    real_writable = cache.writable
    monkeypatch.setattr(cache, "writable", lambda f: f != tmp_path and real_writable(f))
    monkeypatch.setattr(cache, "USER_CACHE", tmp_path / "user_cache")
    sources.open_source(folder)
    assert (list((tmp_path / "user_cache").glob("ro.decoded-*.npz"))
            and not list(tmp_path.glob("*.npz")))
    sources.open_source(folder, cache_dir=str(tmp_path / "mine"))
    assert list((tmp_path / "mine").glob("ro.decoded-*.npz"))


def test_a_damaged_cache_is_ignored_and_rebuilt(tmp_path):
    folder = image_folder(tmp_path / "f")
    first = sources.open_source(folder)
    npz = next(tmp_path.glob("f.decoded-*.npz"))
    npz.write_bytes(npz.read_bytes()[:5000])
    again = sources.open_source(folder)
    assert np.array_equal(again.train_x, first.train_x)
    assert npz.stat().st_size > 5000, "rewritten whole"


def test_a_decode_killed_while_writing_its_cache_leaves_nothing_that_is_used(tmp_path):
    folder = image_folder(tmp_path / "f")
    script = f"from common.data.sources import open_source; open_source({str(folder)!r})"
    r = run_cli("-c", script, env={"CIFAR_FAILPOINT": "write:cache@kill"})
    assert r.returncode == -9
    assert not list(tmp_path.glob("f.decoded-*.npz")), "no complete-looking cache after the kill"
    assert list(tmp_path.glob("f.decoded-*.npz.tmp-*")), "the kill left its temp file"
    r = run_cli("-c", script)
    assert r.returncode == 0, r.stderr
    assert (list(tmp_path.glob("f.decoded-*.npz"))
            and not list(tmp_path.glob("*.tmp-*"))), "stale temp removed"


# ----------------------------------------------------------------------------- bad input

def test_missing_split_folder_names_it(tmp_path):
    folder = image_folder(tmp_path / "f")
    shutil.rmtree(folder / "test")
    with pytest.raises(UserError, match=r"has no test/ folder.*train/<class>"):
        sources.open_source(folder, download=False)


def test_class_folders_that_differ_between_splits_are_named(tmp_path):
    folder = image_folder(tmp_path / "f")
    (folder / "test" / "cat").rename(folder / "test" / "kitten")
    with pytest.raises(UserError) as e:
        sources.open_source(folder)
    assert "only in train: cat" in str(e.value) and "only in test: kitten" in str(e.value)


def test_no_images_is_a_clear_error(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "f" / split / "cat").mkdir(parents=True)
        (tmp_path / "f" / split / "cat" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no .png/.jpg"):
        sources.open_source(tmp_path / "f")


def test_a_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    folder = image_folder(tmp_path / "f")
    bad = sorted((folder / "train" / "dog").glob("*.png"))[1]
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError) as e:
        sources.open_source(folder)
    assert (str(bad) in str(e.value) and "unreadable" in str(e.value)
            and "--skip-bad-images" in str(e.value))
    s = sources.open_source(folder, skip_bad_images=True)
    assert (len(s.train_x) == 149 and s.provenance()["skipped_images"] == 1
            and str(bad) in s.skipped[0])


def test_an_image_that_is_not_32x32_is_named_with_its_size(tmp_path):
    from PIL import Image

    folder = image_folder(tmp_path / "f")
    big = sorted((folder / "train" / "ship").glob("*.png"))[0]
    Image.new("RGB", (64, 48)).save(big)
    with pytest.raises(UserError) as e:
        sources.open_source(folder)
    assert str(big) in str(e.value) and "64x48" in str(e.value) and "not 32x32" in str(e.value)


@pytest.mark.parametrize("member", ["../escape.png", "/abs/escape.png", "link"])
def test_an_archive_member_that_escapes_is_refused_and_nothing_is_written(tmp_path, member):
    png = (PHOTOS / "cat").glob("*.png").__next__().read_bytes()
    if member == "link":
        path = tmp_path / "evil.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            info = tarfile.TarInfo("cifar/train/cat/link.png")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    else:
        path = tmp_path / "evil.zip"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("cifar/train/cat/0.png", png)
            z.writestr(member, png)
    before = set(tmp_path.parent.rglob("*"))
    with pytest.raises(UserError, match="escapes its folder"):
        sources.open_source(path)
    assert set(tmp_path.parent.rglob("*")) == before, "nothing written anywhere"


def test_cli_reports_a_bad_data_dir_in_one_line(tmp_path):
    (tmp_path / "not_an_archive.txt").write_text("x")
    r = run_cli("train_resnet_cifar.py", "--no-pretrained", "--data-dir",
                str(tmp_path / "not_an_archive.txt"), "--output-dir", str(tmp_path / "run"))
    one_line_error(r, "not_an_archive.txt", ".tar.gz")
    assert not (tmp_path / "run" / "last.pt").exists()


# ---------------------------------------------------------------------- official batches, downloads

def _damage(folder: Path, how: str) -> str:
    target = folder / sources.BATCHES / "data_batch_3"
    if how == "missing":
        target.unlink()
    elif how == "truncated":
        target.write_bytes(target.read_bytes()[:1000])
    elif how == "shape":
        target.write_bytes(pickle.dumps({b"data": np.zeros((10, 100), np.uint8),
                                         b"labels": [0] * 10}))
    elif how == "label":
        target.write_bytes(pickle.dumps({b"data": np.zeros((10, 3072), np.uint8),
                                         b"labels": [0] * 9 + [10]}))
    elif how == "foreign":  # a pickle that would build a foreign object when loaded
        target.write_bytes(pickle.dumps({b"data": io.BytesIO(b"x")}))
    return target.name


@pytest.mark.parametrize("how,words", [("missing", "missing"), ("truncated", "unreadable"),
                                       ("shape", "expected (N, 3072)"), ("label", "outside 0..9"),
                                       ("foreign", "disallowed object")])
def test_damaged_batches_give_one_clear_error(tmp_path, how, words):
    make_cifar_dir(tmp_path, 200, 50)
    name = _damage(tmp_path, how)
    with pytest.raises(UserError) as e:
        sources.open_source(tmp_path, download=False)
    msg = str(e.value)
    assert name in msg and words in msg and "re-download" in msg


def test_no_data_and_no_download_names_the_folder(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        sources.open_source(tmp_path / "d", download=False)
    with pytest.raises(UserError) as e:
        sources.ensure_batches(tmp_path, download=False)
    assert (str(tmp_path) in str(e.value) and "--no-download" in str(e.value)
            and "image folder" in str(e.value))


def test_no_network_fails_fast_with_placement_hint(tmp_path, monkeypatch):
    """Fast because each source is probed once and nothing is fetched from an unreachable one."""
    probes = []
    monkeypatch.setattr(sources, "host_reachable",
                        lambda url, timeout=4.0: probes.append(url) or False)
    monkeypatch.setattr(sources, "download_official",
                        lambda *a: pytest.fail("tried the official server"))
    monkeypatch.setattr(sources, "download_huggingface",
                        lambda *a: pytest.fail("tried the Hugging Face copy"))
    with pytest.raises(UserError) as e:
        sources.open_source(tmp_path, download=True)
    assert probes == [sources.CIFAR_URL, "https://huggingface.co"]
    msg = str(e.value)
    assert "official server: unreachable" in msg and "Hugging Face copy: unreachable" in msg
    assert str(tmp_path / sources.BATCHES / "data_batch_1") in msg


def test_official_download_path_extracts_the_archive(tmp_path):
    src = make_cifar_dir(tmp_path / "src", 100, 20)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / sources.BATCHES, arcname=sources.BATCHES)
    dest = tmp_path / "dest"
    sources.download_official(dest, url=archive.as_uri(), md5=sources.file_digest(archive, "md5"))
    assert not (dest / "cifar-10-python.tar.gz").exists()
    assert np.array_equal(sources.open_source(dest).train_x, sources.open_source(src).train_x)


def test_failed_official_download_falls_back_then_explains(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sources, "host_reachable", lambda url, timeout=4.0: True)
    monkeypatch.setattr(sources, "CIFAR_URL", (tmp_path / "nope.tar.gz").as_uri())

    def fake_hf(folder):
        calls.append(folder)
        raise OSError("hub unreachable")

    monkeypatch.setattr(sources, "download_huggingface", fake_hf)
    with pytest.raises(UserError) as e:
        sources.open_source(tmp_path / "d", download=True)
    assert ("official server:" in str(e.value)
            and "Hugging Face copy: hub unreachable" in str(e.value))
    assert calls, "the Hugging Face fallback was not tried"


def test_hugging_face_rows_convert_to_cifar_arrays():
    import pandas as pd
    from PIL import Image

    files = sorted(PHOTOS.glob("*/*.png"))[:12]
    rows = pd.DataFrame({"img": [{"bytes": f.read_bytes()} for f in files],
                         "label": [folders.CIFAR_CLASSES.index(f.parent.name) for f in files]})
    x, y = sources.parquet_to_arrays(rows)
    assert x.shape == (12, 3, 32, 32) and x.dtype == np.uint8 and list(y) == list(rows["label"])
    assert np.array_equal(x[0].transpose(1, 2, 0), np.asarray(Image.open(files[0]).convert("RGB")))


def test_the_real_archive_reads_as_cifar10(archive, archive_cache):
    s = sources.open_source(archive, cache_dir=archive_cache)
    assert s.kind == "tar" and s.classes == folders.CIFAR_CLASSES
    assert (np.bincount(s.train_y).tolist() == [5000] * 10
            and np.bincount(s.test_y).tolist() == [1000] * 10)
    assert s.provenance()["name"] == "CIFAR-10"
