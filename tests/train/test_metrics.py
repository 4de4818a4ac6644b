"""Metric writer (TensorBoard events + JSONL + PNG, locally and on a fake bucket), progress bar."""

import io
import json
import logging
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.fake_bucket import fake_bucket
from PIL import Image
from tensorboardX.proto import event_pb2

from dpwave import files
from dpwave.train.metrics import MetricWriter, Progress

pytestmark = pytest.mark.integration


def _read_events(workdir) -> tuple[dict, dict]:
    """Parses the TFRecord event files: ({tag: [(step, value)]}, {tag: [(step, png_bytes)]})."""
    scalars, images = {}, {}
    for path in sorted(files.as_path(workdir / "tensorboard").glob("events.out.tfevents.*")):
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
    assert (last["step"], last["stage"], last["loss"]) == (5, "refiner", "NaN")  # strict JSON
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


def test_a_bucket_workdir_gets_every_file():
    with fake_bucket():
        root = files.as_path("gs://bucket/run/dp")
        with MetricWriter(root, is_process0=True, stage="dp") as writer:
            writer.write_scalars(1, {"loss": 2.5, "epsilon": float("inf")})
            png = writer.write_images(1, "grid", np.full((4, 4), 9, np.uint8))
        assert json.loads((root / "metrics.jsonl").read_text()) == {"step": 1, "stage": "dp", "loss": 2.5,
                                                                     "epsilon": "Infinity"}
        assert png == root / "images" / "dp_grid_00000001.png" and png.exists()
        scalars, images = _read_events(root)
        assert scalars["dp/loss"] == [(1, 2.5)] and [s for s, _ in images["dp/grid"]] == [1]


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
    with MetricWriter(tmp_path, is_process0=True) as writer, pytest.raises(ValueError, match=match):
        writer.write_scalars(1, scalars)


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
