"""FID InceptionV3 with random weights (the real ones cannot be downloaded here).

Most tests run the network at input size 75 (same weights, cheaper); one runs FID at 299.
"""
import numpy as np
import pytest

from dpwave.evaluate import convert_inception_weights
from dpwave.evaluate.fid import fid, inception_features
from dpwave.evaluate.inception import pool3x3_same, resize_bilinear
from dpwave.evaluate.inception_weights import (
    TORCH_WEIGHTS_URL, InceptionWeightsError, arrays_from_torch_state_dict, inception_arrays,
    inception_from_arrays, load_inception, save_arrays, weight_shapes)

pytestmark = pytest.mark.unit

SMALL = 75


def _random_arrays(seed: int) -> dict[str, np.ndarray]:
    """He-scaled kernels and non-trivial batch-norm statistics, so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in weight_shapes().items():
        leaf = key.rsplit(".", 1)[1]
        if leaf == "kernel":
            value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif leaf in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, size=shape)
        else:  # bias, mean
            value = rng.normal(size=shape) * 0.1
        out[key] = value.astype(np.float32)
    return out


@pytest.fixture(scope="module")
def arrays():
    return _random_arrays(0)


@pytest.fixture(scope="module")
def model(arrays):
    return inception_from_arrays(arrays, input_size=SMALL)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)


def test_parameter_count_matches_torchvision_backbone():
    # torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696)
    # and the 1000-way fc (2,049,000) the backbone FID uses has 21,785,568.
    shapes = weight_shapes()
    params = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith((".mean", ".var")))
    assert params == 21_785_568
    assert shapes["Mixed_7c.branch_pool.conv.kernel"] == (1, 1, 2048, 192)
    assert shapes["Mixed_6b.branch7x7_2.conv.kernel"] == (1, 7, 128, 128)


def test_features_shape_finite_and_deterministic(model, images):
    f1 = inception_features(images, model, batch_size=3)
    f2 = inception_features(images, model, batch_size=3)
    assert f1.shape == (3, 2048) and f1.dtype == np.float32
    assert np.all(np.isfinite(f1)) and f1.std() > 1e-3
    np.testing.assert_array_equal(f1, f2)
    assert not np.allclose(f1[0], f1[1])


def test_batch_size_invariance(model, images):
    full = inception_features(images, model, batch_size=3)
    np.testing.assert_allclose(inception_features(images, model, batch_size=2), full, rtol=1e-4, atol=1e-5)


def test_grayscale_is_repeated_to_rgb(model, images):
    gray = images[..., :1]
    np.testing.assert_array_equal(inception_features(gray, model, batch_size=3),
                                  inception_features(np.repeat(gray, 3, axis=-1), model, batch_size=3))


def test_weight_file_round_trip(model, images, tmp_path):
    path = tmp_path / "inception.npz"
    save_arrays(inception_arrays(model), path)
    loaded = load_inception(path, input_size=SMALL)
    np.testing.assert_array_equal(inception_features(images, loaded, batch_size=3),
                                  inception_features(images, model, batch_size=3))


def _torch_layout(arrays):
    """The pytorch-fid state dict (as numpy) that these arrays would have come from."""
    out = {"fc.weight": np.zeros((1008, 2048), np.float32), "fc.bias": np.zeros(1008, np.float32)}
    bn_names = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    for key, value in arrays.items():
        prefix, leaf = key.rsplit(".", 1)
        if leaf == "kernel":
            out[prefix + ".weight"] = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        else:
            out[prefix + "." + bn_names[leaf]] = value
            out[prefix + ".num_batches_tracked"] = np.zeros((), np.int64)
    return out


def test_torch_state_dict_conversion(arrays):
    converted = arrays_from_torch_state_dict(_torch_layout(arrays))
    assert converted.keys() == arrays.keys()
    for key, value in arrays.items():
        np.testing.assert_array_equal(converted[key], value)
    with pytest.raises(InceptionWeightsError, match="AuxLogits"):
        arrays_from_torch_state_dict({"AuxLogits.conv0.conv.bias": np.zeros(3)})


def test_converter_cli_writes_a_loadable_file(arrays, model, images, tmp_path, monkeypatch):
    # Everything but torch.load, which needs PyTorch (not installed here).
    monkeypatch.setattr(convert_inception_weights, "_load_torch_state_dict", lambda path: _torch_layout(arrays))
    out = tmp_path / "converted.npz"
    convert_inception_weights.main(["pt_inception-2015-12-05-6726825d.pth", str(out)])
    np.testing.assert_array_equal(inception_features(images, load_inception(out, input_size=SMALL), batch_size=3),
                                  inception_features(images, model, batch_size=3))


def test_missing_weights_file_explains_how_to_get_it(tmp_path):
    with pytest.raises(InceptionWeightsError, match="not found") as err:
        load_inception(tmp_path / "nope.npz")
    assert isinstance(err.value, ValueError)
    assert TORCH_WEIGHTS_URL in str(err.value)
    assert "dpwave.evaluate.convert_inception_weights" in str(err.value)


def test_malformed_weight_files_are_refused(arrays, tmp_path):
    with pytest.raises(InceptionWeightsError, match="1 missing"):
        inception_from_arrays({k: v for k, v in arrays.items() if k != "Mixed_5b.branch1x1.bn.var"})
    bad = dict(arrays, **{"Conv2d_1a_3x3.conv.kernel": np.zeros((3, 3, 1, 32), np.float32)})
    with pytest.raises(InceptionWeightsError, match=r"Conv2d_1a_3x3.conv.kernel has shape \(3, 3, 1, 32\)"):
        inception_from_arrays(bad)
    not_npz = tmp_path / "w.npz"
    not_npz.write_text("not a zip")
    with pytest.raises(InceptionWeightsError, match="cannot read"):
        load_inception(not_npz)


def test_resize_matches_pytorch_bilinear_align_corners_false():
    def torch_weights(n_in, n_out):  # PyTorch's upsample_bilinear2d index arithmetic
        w = np.zeros((n_out, n_in))
        for o in range(n_out):
            src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(src), n_in - 1)
            i1, lam = min(i0 + 1, n_in - 1), src - i0
            w[o, i0] += 1 - lam
            w[o, i1] += lam
        return w
    x = np.random.default_rng(2).uniform(-1, 1, size=(1, 32, 40, 3)).astype(np.float32)
    for size in (299, 24):
        expected = np.einsum("oh,nhwc->nowc", torch_weights(32, size), x)
        expected = np.einsum("nowc,pw->nopc", expected, torch_weights(40, size))
        np.testing.assert_allclose(np.asarray(resize_bilinear(x, size)), expected, atol=2e-4)


def test_fid_average_pool_excludes_padding():
    ones = np.ones((1, 4, 4, 1), np.float32)
    np.testing.assert_array_equal(np.asarray(pool3x3_same(ones, "avg")), ones)
    ramp = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1) - 20.0  # all negative: zero padding would win a max
    assert float(np.asarray(pool3x3_same(ramp, "max"))[0, 0, 0, 0]) == ramp[0, 1, 1, 0]


def test_fid_end_to_end_at_299(arrays, images, tmp_path):
    path = tmp_path / "inception.npz"
    save_arrays(arrays, path)
    a, b = images[:2], 255 - images[:2]
    assert fid(a, a, path, batch_size=2) == pytest.approx(0.0, abs=1e-6)
    assert fid(a, b, path, batch_size=2) > 0.0
