"""DatasetSpec validation and the privacy boundary."""
import ml_collections
import pytest

from dpwave.data import DatasetSpec, PrivacyError, require_public
from dpwave.data.boundary import check_split_tag, split_names
from dpwave.data.builders.mnist5k import Mnist5k

pytestmark = pytest.mark.unit

MNIST5K = Mnist5k.SPLITS


def test_privacy_is_required_and_validated():
    with pytest.raises(TypeError):
        DatasetSpec("mnist5k", "public")  # pylint: disable=no-value-for-parameter
    with pytest.raises(ValueError, match=r"privacy='secret'.*'public' or 'private'"):
        DatasetSpec("mnist5k", "public", "secret")
    with pytest.raises(ValueError, match="privacy=None"):
        DatasetSpec("mnist5k", "public", None)
    with pytest.raises(ValueError, match=r"missing required keys \['privacy'\]"):
        DatasetSpec.from_config({"name": "mnist5k", "split": "public", "privacy": None})


@pytest.mark.parametrize("kwargs, match", [
    ({"resolution": 0}, "resolution=0"),
    ({"resolution": 32.0}, "resolution=32.0"),
    ({"channels": 2}, "channels=2"),
    ({"in_memory": "yes"}, "in_memory='yes'"),
    ({"labels": []}, r"labels=\[\] must be a non-empty list"),
    ({"labels": [1, "2"]}, "labels=.*int class ids"),
])
def test_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DatasetSpec("mnist5k", "public", "public", **kwargs)
    with pytest.raises(ValueError, match="split=''"):
        DatasetSpec("mnist5k", "", "public")


def test_from_config_configdict_and_dict_roundtrip():
    config = ml_collections.ConfigDict({"name": "cifar10", "split": "train[:10%]",
                                        "privacy": "public", "resolution": 16, "channels": 1})
    spec = DatasetSpec.from_config(config)
    assert spec == DatasetSpec("cifar10", "train[:10%]", "public", resolution=16, channels=1)
    assert DatasetSpec.from_config(spec.to_dict()) == spec
    subset = DatasetSpec.from_config({**spec.to_dict(), "labels": [0, 1]})
    assert subset.labels == (0, 1) and DatasetSpec.from_config(subset.to_dict()) == subset
    with pytest.raises(ValueError, match=r"unknown dataset config keys \['resolutoin'\]"):
        DatasetSpec.from_config({"name": "x", "split": "train", "privacy": "public",
                                 "resolutoin": 3})
    with pytest.raises(ValueError, match=r"missing required keys \['privacy'\]"):
        DatasetSpec.from_config({"name": "x", "split": "train"})


def test_require_public():
    require_public(DatasetSpec("mnist5k", "public", "public"), "tokenizer")
    private = DatasetSpec("mnist5k", "private", "private")
    with pytest.raises(PrivacyError) as info:
        require_public(private, "refiner")
    assert str(info.value).startswith(
        "refiner trains without DP and must not read private dataset mnist5k/private; only the DP "
        "trainer may")

    class FakeSource:
        spec = private

    with pytest.raises(PrivacyError, match="AR pretraining"):
        require_public(FakeSource(), "AR pretraining")


def test_split_names_and_private_split_tags():
    assert split_names("train[:10%]+ test[5:]", ("train", "test")) == {"train", "test"}
    assert split_names("private", ("public", "private")) == {"private"}
    check_split_tag(DatasetSpec("mnist5k", "private[:50%]", "private"), MNIST5K, ("private",))
    check_split_tag(DatasetSpec("mnist5k", "public", "private"), MNIST5K, ("private",))  # conservative: ok
    with pytest.raises(PrivacyError, match=r"\['private'\] hold private data.*privacy='private'"):
        check_split_tag(DatasetSpec("mnist5k", "public+private[:10]", "public"), MNIST5K, ("private",))
