"""Metric writer (TensorBoard events + JSONL + PNG), image grids, atomic PNGs, progress bar."""

import io
import json
import logging
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from dpwave.train.metrics import MetricWriter, Progress, image_grid, save_png


def _read_events(workdir: Path) -> tuple[dict, dict]:
    """Parses the TFRecord event files: ({tag: [(step, value)]}, {tag: [(step, png_bytes)]})."""
    scalars, images = {}, {}
    for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    images.setdefault(value.tag, []).append((event.step, value.image.encoded_image_string))
                else:
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars, images


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
    with MetricWriter(tmp_path, is_process0=True, stage="dp") as writer:
        writer.write_scalars(1, {"loss": jnp.float32(2.5), "epsilon": np.float64(0.25), "n": 3})
        writer.write_scalars(2, {"loss": 1.5})
    with MetricWriter(tmp_path, is_process0=True, stage="refiner") as writer:  # appends
        writer.write_scalars(5, {"loss": float("nan")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines[:2]] == [
        {"step": 1, "stage": "dp", "loss": 2.5, "epsilon": 0.25, "n": 3},
        {"step": 2, "stage": "dp", "loss": 1.5}]
    last = json.loads(lines[2])
    assert (last["step"], last["stage"]) == (5, "refiner") and np.isnan(last["loss"])
    assert isinstance(json.loads(lines[0])["n"], int)
    scalars, _ = _read_events(tmp_path)
    assert scalars["dp/loss"] == [(1, 2.5), (2, 1.5)]
    assert scalars["dp/epsilon"] == [(1, 0.25)]
    assert np.isnan(scalars["refiner/loss"][0][1])


def test_images_go_to_png_and_tensorboard(tmp_path):
    grid = np.random.default_rng(0).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    with MetricWriter(tmp_path, is_process0=True, stage="sample") as writer:
        path = writer.write_images(300, "grid/cfg2", grid)
        gray_path = writer.write_images(301, "gray", grid[..., 0])
        with pytest.raises(ValueError, match=r"\(H, W\)"):
            writer.write_images(302, "batch", np.zeros((2, 4, 4, 3), np.uint8))
    assert path == tmp_path / "images" / "sample_grid_cfg2_00000300.png"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
    np.testing.assert_array_equal(np.asarray(Image.open(gray_path)), grid[..., 0])
    _, images = _read_events(tmp_path)
    (step, png), = images["sample/grid/cfg2"]
    assert step == 300 and [s for s, _ in images["sample/gray"]] == [301]
    assert "sample/batch" not in images
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), grid)


def test_other_processes_only_log(tmp_path, caplog):
    with caplog.at_level(logging.INFO), MetricWriter(tmp_path / "w", is_process0=False,
                                                     stage="dp") as writer:
        writer.write_scalars(1, {"loss": 1.0})
        assert writer.write_images(1, "grid", np.zeros((4, 4), np.uint8)) is None
    assert not (tmp_path / "w").exists()
    assert "[dp] step 1: loss=1" in caplog.text


@pytest.mark.parametrize("scalars,match", [({"loss": np.ones(3)}, "real scalar"),
                                           ({"loss": "high"}, "real scalar"),
                                           ({"step": 1.0}, "reserved"),
                                           ({"bad name": 1.0}, "valid name")])
def test_bad_scalars_are_rejected(tmp_path, scalars, match):
    with MetricWriter(tmp_path, is_process0=True) as writer:
        with pytest.raises(ValueError, match=match):
            writer.write_scalars(1, scalars)


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


def test_progress_touches_tqdm_every_k_steps(capsys):
    bar = Progress(total=100, initial=10, desc="dp", every=10)
    calls = []
    original = bar._bar.update
    bar._bar.update = lambda n: (calls.append(n), original(n))
    for step in range(25):
        bar.update()
        bar.set_postfix(epsilon=0.5 + step / 100)
    assert bar.n == 35 and calls == [10, 10]
    bar.close()
    assert calls == [10, 10, 5]
    err = capsys.readouterr().err
    assert "35/100" in err and "epsilon=0.74" in err and "step/s" in err


def test_progress_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every"):
        Progress(total=10, every=0)
    with pytest.raises(ValueError, match="initial"):
        Progress(total=10, initial=11)
