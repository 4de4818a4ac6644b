"""dpwave.grids: image grids, labelled sample sheets and atomic PNG writes (locally and on a fake bucket)."""
import numpy as np
import pytest
from helpers.fake_bucket import fake_bucket
from PIL import Image

from dpwave import files
from dpwave.grids import image_grid, sample_grid, save_png

pytestmark = pytest.mark.unit


def test_image_grid_layout():
    images = np.stack([np.full((2, 3), v, np.uint8) for v in (10, 20, 30)])
    grid = image_grid(images, nrow=2, padding=1, pad_value=255)
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 1) and grid.dtype == np.uint8
    expected = np.full((7, 9), 255, np.uint8)
    expected[1:3, 1:4], expected[1:3, 5:8], expected[4:6, 1:4] = 10, 20, 30
    np.testing.assert_array_equal(grid[..., 0], expected)
    rgb = image_grid(np.zeros((5, 4, 4, 3), np.uint8), nrow=8, padding=0)
    assert rgb.shape == (4, 20, 3)  # nrow is capped at the number of images


@pytest.mark.parametrize("images,nrow,match", [(np.zeros((2, 4, 4), np.float32), 2, "uint8"),
                                               (np.zeros((0, 4, 4), np.uint8), 2, "N >= 1"),
                                               (np.zeros((2, 4, 4, 2), np.uint8), 2, "C in"),
                                               (np.zeros((2, 4, 4), np.uint8), 0, "nrow")])
def test_image_grid_rejects_bad_input(images, nrow, match):
    with pytest.raises(ValueError, match=match):
        image_grid(images, nrow)


def test_save_png_round_trip_is_atomic(tmp_path):
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5, 1)
    path = save_png(tmp_path / "sub" / "g.png", gray)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), gray[..., 0])
    save_png(path, np.zeros((4, 5), np.uint8))  # replaces in place
    assert np.asarray(Image.open(path)).max() == 0
    assert [p.name for p in path.parent.iterdir()] == ["g.png"]  # no temporary files left
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "f.png", np.zeros((4, 5)))
    assert not (tmp_path / "f.png").exists()


def test_sample_grid_writes_labelled_rows(tmp_path):
    rng = np.random.default_rng(0)
    rows = {"real": rng.integers(0, 256, (5, 32, 32, 1), np.uint8),
            "coarse": rng.integers(0, 256, (3, 32, 32), np.uint8),
            "generated": rng.integers(0, 256, (2, 32, 32, 3), np.uint8)}
    path = sample_grid(rows, tmp_path / "grid.png", ncol=3)
    png = np.asarray(Image.open(path))
    cells = np.concatenate([np.repeat(rows["real"][:3], 3, -1), np.repeat(rows["coarse"][..., None], 3, -1),
                            rows["generated"], np.zeros((1, 32, 32, 3), np.uint8)])
    grid = image_grid(cells, 3)
    assert grid.shape == (3 * 34 + 2, 3 * 34 + 2, 3) and png.shape[0] == grid.shape[0] and png.ndim == 3
    label_width = png.shape[1] - grid.shape[1]
    assert label_width > 10
    np.testing.assert_array_equal(png[:, label_width:], grid)
    for row in range(3):  # every row has its label drawn in the left column
        assert png[2 + 34 * row: 34 + 34 * row, :label_width].max() > 128

    gray = np.asarray(Image.open(sample_grid({"real": rows["real"]}, tmp_path / "g.png", ncol=5)))
    assert gray.ndim == 2 and gray.shape[0] == 36
    with pytest.raises(ValueError, match="different image sizes"):
        sample_grid({"a": rows["real"], "b": rows["real"][:, :16]}, tmp_path / "x.png", ncol=2)
    with pytest.raises(ValueError, match="uint8"):
        sample_grid({"a": rows["real"].astype(np.float32)}, tmp_path / "x.png", ncol=2)


def test_png_on_a_bucket():
    with fake_bucket():
        path = save_png("gs://bucket/run/samples.png", np.full((4, 6, 3), 7, np.uint8))
        assert str(path) == "gs://bucket/run/samples.png"
        with path.open("rb") as f:
            assert np.asarray(Image.open(f)).max() == 7
        assert [p.name for p in files.as_path("gs://bucket/run").iterdir()] == ["samples.png"]
