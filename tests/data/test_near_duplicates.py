"""Near copies of private images in public roles (dpwave/data/near_duplicates.py, overlap.check_disjoint)."""
import io
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from dpwave.data import DatasetSpec, PrivateOverlapError, Source, load, near_duplicates, overlap
from dpwave.data.builders.mnist5k import example_id, mnist5k_arrays, split_rows

pytestmark = pytest.mark.unit

ROLE = "config.data.public"
PHOTOS = ("astronaut", "camera", "coffee")


def in_memory(name: str, images: list[np.ndarray], ids: list[str], privacy: str = "public") -> Source:
    """A Source over decoded images (not cacheable: no data files)."""
    records = [{"image": image, "id": i} for image, i in zip(images, ids)]
    return Source(records, DatasetSpec(name, "train", privacy), ["image", "id"])


def square(image: np.ndarray, side: int) -> np.ndarray:
    image = np.asarray(image)
    image = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]
    h, w = image.shape[:2]
    m = min(h, w)
    crop = image[(h - m) // 2: (h - m) // 2 + m, (w - m) // 2: (w - m) // 2 + m]
    return np.asarray(Image.fromarray(crop).resize((side, side), Image.Resampling.LANCZOS))


def one_pixel(image: np.ndarray) -> np.ndarray:
    """The brightest pixel (on a digit's stroke) set to black, the other channels too."""
    out = image.copy()
    y, x = np.unravel_index(np.argmax(image.sum(-1)), image.shape[:2])
    out[y, x] = 0
    return out


def brighter(image: np.ndarray) -> np.ndarray:
    return np.clip(image.astype(np.int16) + 1, 0, 255).astype(np.uint8)


def jpeg95(image: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "JPEG", quality=95)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    return decoded.reshape(image.shape)


def shifted(dy: int, dx: int, fill: str = "edge"):
    """Moves the content by (dy, dx) pixels; the uncovered row/column is the old edge ("edge") or black."""
    def shift(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge" if fill == "edge" else "constant")
        return padded[1 - dy: 1 - dy + h, 1 - dx: 1 - dx + w]
    return shift


EDITS = {"one_pixel": one_pixel, "brightness_plus_1": brighter, "jpeg_q95": jpeg95,
         "shift_up": shifted(-1, 0), "shift_down": shifted(1, 0), "shift_left": shifted(0, -1),
         "shift_right": shifted(0, 1)}


@pytest.fixture(scope="module")
def digits() -> dict[str, tuple[list[np.ndarray], list[str]]]:
    """mnist5k's splits as (images, ids): one distribution, different digits."""
    images, labels = mnist5k_arrays()
    return {name: ([images[r] for r in rows], [example_id(int(r)) for r in rows])
            for name, rows in split_rows(labels).items()}


@pytest.fixture(scope="module")
def photos() -> dict[int, list[np.ndarray]]:
    originals = [getattr(skimage_data, name)() for name in PHOTOS]
    return {side: [square(p, side) for p in originals] for side in (64, 128, 256)}


def private_set(digits, photos, kind: str) -> tuple[list[np.ndarray], list[str]]:
    if kind == "digits":
        return digits["private"][0][:40], digits["private"][1][:40]
    side = int(kind.removeprefix("photos"))
    return photos[side], [f"{name}{side}" for name in PHOTOS]


@pytest.mark.parametrize("kind", ["digits", "photos64", "photos128", "photos256"])
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_private_image_is_refused(edit, kind, digits, photos):
    images, ids = private_set(digits, photos, kind)
    target = len(images) // 2
    private = in_memory("secret", images, ids, privacy="private")
    public_images = [EDITS[edit](images[target])] + (digits["public"][0][:20] if kind == "digits" else [])
    public = in_memory("crawl", public_images, ["copy"] + [f"q{i}" for i in range(len(public_images) - 1)])
    with pytest.raises(PrivateOverlapError) as info:
        overlap.check_disjoint(private, {ROLE: public})
    message = str(info.value)
    assert "\n" not in message
    assert f"{ROLE} (crawl/train) holds 1 of {len(public_images)} near copies" in message
    assert f"'copy' ~ private {ids[target]!r}" in message
    assert "remove them from those datasets or use disjoint splits" in message


@pytest.mark.parametrize("fill", ["edge", "black"])
def test_a_one_pixel_shift_matches_a_private_shift_whatever_the_fill(fill, digits, photos):
    for image in (digits["private"][0][7], photos[64][0]):
        private = near_duplicates.descriptors(image[None], near_duplicates.SHIFTS)
        for dy, dx in near_duplicates.SHIFTS:
            public = near_duplicates.descriptors(shifted(dy, dx, fill)(image)[None])[:, 0]
            assert near_duplicates.similarity(public[:, None], private).max() > 1 - 1e-5


def test_distinct_digits_of_one_distribution_pass(digits, tmp_path):
    private = in_memory("mnist5k", *digits["private"], privacy="private")
    public = {f"config.data.{name}": in_memory("mnist5k", *digits[name]) for name in ("public", "heldout")}
    hashes = overlap.check_disjoint(private, public, report_dir=os.fspath(tmp_path / "dp_finetune"))
    assert list(hashes) == ["private", *public]
    report = json.loads((tmp_path / "dp_finetune" / overlap.REPORT_NAME).read_text())
    closest = [pair["similarity"] for role in report["roles"].values() for pair in role["closest"]]
    assert report["threshold"] == near_duplicates.DEFAULT_THRESHOLD and report["floor"] == overlap.REPORT_FLOOR
    assert all(role["near_copies"] == 0 for role in report["roles"].values())
    assert all(overlap.REPORT_FLOOR <= s < near_duplicates.DEFAULT_THRESHOLD for s in closest)


def test_the_report_is_owner_only_and_named_in_the_refusal(digits, tmp_path, caplog):
    images, ids = digits["private"]
    private = in_memory("mnist5k", images[:30], ids[:30], privacy="private")
    public = in_memory("crawl", [brighter(images[3]), jpeg95(images[5]), digits["test"][0][0]], ["a", "b", "c"])
    report_dir = tmp_path / "run" / "dp_finetune"
    with pytest.raises(PrivateOverlapError, match=r"holds 2 of 3 near copies") as info:
        overlap.check_disjoint(private, {ROLE: public}, report_dir=os.fspath(report_dir))
    path = report_dir / overlap.REPORT_NAME
    assert str(info.value).endswith(f"; the closest pairs: {path}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(report_dir.stat().st_mode) == 0o700
    report = json.loads(path.read_text())
    pairs = report["roles"][ROLE]["closest"]
    assert {(p["public"], p["private"]) for p in pairs} == {("a", ids[3]), ("b", ids[5])}
    assert set(pairs[0]) == {"public", "private", "similarity"}  # ids and similarities, no pixels
    assert not any(ids[3] in r.getMessage() for r in caplog.records)  # nothing about the pairs in the logs


@pytest.mark.parametrize("threshold", [0.5, 1.01, math.nan, True, "0.998", None])
def test_threshold_is_validated(threshold, digits):
    private = in_memory("mnist5k", digits["private"][0][:2], digits["private"][1][:2], privacy="private")
    with pytest.raises(ValueError, match=r"threshold=.* must be a number in \[0.9, 1\]"):
        overlap.check_disjoint(private, {}, threshold=threshold)


def test_a_lower_threshold_refuses_more(digits, tmp_path):
    private = in_memory("mnist5k", *digits["private"], privacy="private")
    public = in_memory("mnist5k", *digits["heldout"])
    overlap.check_disjoint(private, {ROLE: public})
    with pytest.raises(PrivateOverlapError, match=r"holds [1-9][0-9]* of 500 near copies"):
        overlap.check_disjoint(private, {ROLE: public}, threshold=0.99, report_dir=os.fspath(tmp_path))
    report = json.loads((tmp_path / overlap.REPORT_NAME).read_text())
    closest = [pair["similarity"] for pair in report["roles"][ROLE]["closest"]]
    assert report["floor"] == 0.99 and closest == sorted(closest, reverse=True) and min(closest) >= 0.99
    assert report["roles"][ROLE]["near_copies"] == len(closest)


def test_flat_images_are_never_near_copies():
    black = np.zeros((32, 32, 1), np.uint8)
    private = in_memory("flat", [black], ["p"], privacy="private")
    overlap.check_disjoint(private, {ROLE: in_memory("flat", [black + 1, black + 255], ["a", "b"])})
    assert not np.any(near_duplicates.descriptors(np.stack([black, black + 7])))


def test_the_index_finds_every_pair_above_the_floor():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (40, 32, 32, 1)).astype(np.uint8)
    smooth = np.stack([np.asarray(Image.fromarray(b[..., 0]).resize((4, 4)).resize((32, 32))) for b in base])
    private = near_duplicates.descriptors(np.concatenate([base[:20], smooth[:20, ..., None]]), near_duplicates.SHIFTS)
    noisy = [np.clip(b.astype(int) + rng.integers(-s, s + 1, b.shape), 0, 255).astype(np.uint8)
             for b, s in zip(np.concatenate([base, smooth[..., None]]), rng.integers(0, 60, 80))]
    public = near_duplicates.descriptors(np.stack(noisy))[:, 0]
    brute = near_duplicates.similarity(public[:, None, None], private[None]).max((1, 2))
    for floor in (0.9, 0.99):
        found = near_duplicates.nearest_private(public, private, floor)
        clear = np.abs(brute - floor) > 1e-4
        np.testing.assert_array_equal((found.private_index >= 0)[clear], (brute >= floor)[clear])
        hits = found.private_index >= 0
        np.testing.assert_allclose(found.similarity[hits], brute[hits], atol=1e-5)
        assert hits.any() and not hits.all()


def test_descriptors_take_any_size_from_eight_pixels():
    rng = np.random.default_rng(1)
    for shape in ((8, 8, 1), (40, 56, 3), (256, 256, 4)):
        d = near_duplicates.descriptors(rng.integers(0, 256, (2, *shape)).astype(np.uint8), near_duplicates.SHIFTS)
        assert d.shape == (2, 9, near_duplicates.DIM) and np.allclose(np.linalg.norm(d, axis=-1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="at least 8 px"):
        near_duplicates.descriptors(np.zeros((1, 7, 32, 1), np.uint8))


def random_folder(root: Path, count: int, seed: int) -> str:
    root.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / f"{root.name}{i}.png")
    return os.fspath(root)


def test_descriptors_and_nearest_pairs_are_cached_owner_only(tmp_path, monkeypatch):
    data_dir = os.fspath(tmp_path / "tfds")
    private_spec = DatasetSpec("image_folder", "train", "private", data_dir=data_dir, resolution=12,
                               manual_dir=random_folder(tmp_path / "p", 3, seed=2))
    public_spec = DatasetSpec("image_folder", "train", "public", data_dir=data_dir, resolution=12,
                              manual_dir=random_folder(tmp_path / "q", 4, seed=3), override_private_default=True)
    hashes, vectors = overlap.content(load(private_spec), near_duplicates.SHIFTS)
    assert (hashes.hashed, vectors.computed) == (3, 3) and vectors.vectors.shape == (3, 9, near_duplicates.DIM)
    assert vectors.cache_path not in (None, hashes.cache_path)
    assert vectors.cache_path != overlap.cache_path(load(private_spec),
                                                    overlap.descriptor_scheme(near_duplicates.NO_SHIFT))
    again_hashes, again = overlap.content(load(private_spec), near_duplicates.SHIFTS)
    assert (again_hashes.hashed, again.computed) == (0, 0)
    np.testing.assert_array_equal(again.vectors, vectors.vectors)

    overlap.check_disjoint(load(private_spec), {ROLE: load(public_spec)})
    folder = Path(hashes.cache_path).parent
    assert len(list(folder.iterdir())) == 3  # hashes, descriptors (9 shifts), nearest pairs of the public role
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700

    def no_query(*args, **kwargs):
        raise AssertionError("queried again")
    monkeypatch.setattr(near_duplicates, "nearest_private", no_query)
    overlap.check_disjoint(load(private_spec), {ROLE: load(public_spec)})
