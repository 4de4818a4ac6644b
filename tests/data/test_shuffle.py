"""The public stages' shuffle sampler."""
import json

import numpy as np
import pytest

from dpwave.data import ShuffleSampler

pytestmark = pytest.mark.unit


def test_shuffle_sampler_epochs():
    sampler = ShuffleSampler(10, 3, seed=5)
    assert sampler.steps_per_epoch == 3
    epoch0 = np.concatenate([sampler.batch(t) for t in range(3)])
    epoch1 = np.concatenate([sampler.batch(t) for t in range(3, 6)])
    for epoch in (epoch0, epoch1):
        assert epoch.dtype == np.int32 and len(set(epoch.tolist())) == 9 and epoch.max() < 10
    assert not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(sampler.batch(1), ShuffleSampler(10, 3, seed=5).batch(1))
    np.testing.assert_array_equal(sampler.batch(4), epoch1[3:6])  # out-of-order access agrees
    assert sampler.epoch(5) == 1
    assert not np.array_equal(ShuffleSampler(10, 3, seed=6).permutation(0), sampler.permutation(0))
    tail = ShuffleSampler(10, 3, seed=5, drop_remainder=False)
    assert tail.steps_per_epoch == 4
    assert sorted(np.concatenate([tail.batch(t) for t in range(4)]).tolist()) == list(range(10))
    assert len(tail.batch(3)) == 1


def test_shuffle_sampler_validation_and_state():
    with pytest.raises(ValueError, match="batch_size=11 exceeds num_examples=10"):
        ShuffleSampler(10, 11, seed=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        ShuffleSampler(10, 0, seed=0)
    sampler = ShuffleSampler(50, 8, seed=2, drop_remainder=False)
    restored = ShuffleSampler.from_state_dict(json.loads(json.dumps(sampler.state_dict())))
    assert restored.fingerprint() == sampler.fingerprint()
    np.testing.assert_array_equal(restored.batch(9), sampler.batch(9))
