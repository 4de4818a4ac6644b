"""The DP secret: every stream depends on every bit of it, the noise draws from two keys, and no secret-derived key
is built from a Python int by a path that truncates it."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpwave import privacy
from dpwave.privacy import DpSecret, noise

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
_SECRET = random.Random("test_secret").getrandbits(256) | 1 << 255
# Bit positions across all 256 bits: both ends of every 32-bit word of the canonical bytes, and the top ones.
_POSITIONS = sorted({0, 1, 31, 32, 33, 45, 62, 63, 64, 95, 96, 127, 128, 129, 160, 191, 192, 224, 254, 255})


def _key_data(key: jax.Array) -> np.ndarray:
    return np.asarray(jax.random.key_data(key))


def _streams(secret: DpSecret) -> dict[str, np.ndarray]:
    noise_key, mask_key = secret.noise_keys()
    sampler = privacy.PoissonSampler(1000, 0.1, seed=secret.poisson_seed())
    return {"noise key": _key_data(noise_key), "noise mask key": _key_data(mask_key),
            "per-example key": _key_data(secret.step_key()), "poisson draws": sampler.batch(3)[0],
            "commitment": np.frombuffer(bytes.fromhex(secret.commitment()), np.uint8)}


@pytest.mark.parametrize("position", _POSITIONS)
def test_flipping_any_bit_of_the_secret_changes_every_stream(position):
    base = _streams(DpSecret(_SECRET, 256))
    flipped = _streams(DpSecret(_SECRET ^ 1 << position, 256))
    for name, value in base.items():
        assert not np.array_equal(value, flipped[name]), f"bit {position} does not reach the {name}"


def test_streams_are_apart_and_keys_are_threefry():
    secret = DpSecret(_SECRET, 256)
    keys = [_key_data(k) for k in (*secret.noise_keys(), secret.step_key())]
    assert all(k.shape == (2,) and k.dtype == np.uint32 for k in keys)
    assert len({k.tobytes() for k in keys}) == 3
    assert secret.stream_bytes("noise") != secret.stream_bytes("per-example")


def test_repr_hides_the_value_and_strength_follows_the_bits():
    secret = DpSecret(_SECRET, 256)
    assert str(_SECRET) not in repr(secret) and f"{_SECRET:x}" not in repr(secret)
    assert secret.strong and not DpSecret(12345, 63).strong and DpSecret(7, 3, reproducible=True).strong
    with pytest.raises(ValueError, match="secret value"):
        DpSecret(2**256, 256)


def test_normal_from_bits_maps_bits_as_jax_random_normal_does():
    key = jax.random.key(3)
    bits = jax.random.bits(key, (4096,), jnp.uint32)
    np.testing.assert_allclose(noise.normal_from_bits(bits), jax.random.normal(key, (4096,), jnp.float32),
                               rtol=1e-6, atol=1e-6)


def _noise(key, mask_key, shape=(200_000,)):
    transform = noise.noise_and_normalize(l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=1.0, key=key,
                                          mask_key=mask_key)
    zeros = {"w": jnp.zeros(shape, jnp.float32)}
    updates, state = transform.update(zeros, transform.init(zeros))
    return np.asarray(updates["w"]), state


def test_the_mask_key_changes_the_noise_is_never_stored_and_keeps_it_standard_normal():
    key, mask_key = DpSecret(_SECRET, 256).noise_keys()
    other_mask = DpSecret(_SECRET ^ 1, 256).noise_keys()[1]
    masked, state = _noise(key, mask_key)
    plain, _ = _noise(key, None)
    assert not np.array_equal(masked, plain) and not np.array_equal(masked, _noise(key, other_mask)[0])
    np.testing.assert_array_equal(masked, _noise(key, mask_key)[0])  # deterministic
    np.testing.assert_array_equal(np.asarray(state.key), _key_data(key))  # the state holds the first key only
    assert abs(masked.mean()) < 0.01 and abs(masked.std() - 1) < 0.01  # 200k draws: 4.5 and 3 standard errors
    assert abs(np.mean(masked > 0) - 0.5) < 0.005 and abs(np.corrcoef(masked, plain)[0, 1]) < 0.01


@pytest.mark.parametrize("which, bit", [(w, b) for w in (0, 1) for b in (0, 1, 31, 32, 33, 63)])
def test_every_bit_of_both_noise_keys_reaches_the_noise(which, bit):
    keys = [_key_data(k) for k in DpSecret(_SECRET, 256).noise_keys()]
    flipped = [k.copy() for k in keys]
    flipped[which][bit // 32] ^= np.uint32(1 << bit % 32)
    wrap = lambda data: jax.random.wrap_key_data(jnp.asarray(data), impl="threefry2x32")
    assert not np.array_equal(_noise(*map(wrap, keys), shape=(64,))[0], _noise(*map(wrap, flipped), shape=(64,))[0])


def test_an_int_key_that_jax_would_truncate_is_refused():
    with pytest.raises(ValueError, match="low 32 bits"):
        noise.noise_and_normalize(l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=1.0, key=2**32 + 5)
    # What the refusal prevents: jax.random.key keeps only the low 32 bits of an int (64-bit mode off).
    np.testing.assert_array_equal(_key_data(jax.random.key(2**40 + 5)), _key_data(jax.random.key(5)))


_PUBLIC_INT_KEYS = {  # module -> why its jax.random.key(int) is not secret-derived
    "dpwave/train/streams.py": "stage_key: config.seed, public randomness",
    "dpwave/train/stages/evaluate.py": "key(0) for a FLOPs count",
    "dpwave/privacy/noise.py": "an int key below 2**32 only (refused above)",
}


def test_no_secret_derived_key_is_built_from_an_int():
    """Every `jax.random.key(...)` / `PRNGKey(...)` call in dpwave/ sits in a module listed above; the DP secret's
    streams go through `DpSecret` (HMAC, `wrap_key_data`)."""
    found = {}
    for path in sorted((REPO / "dpwave").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("key", "PRNGKey")
                    and ast.unparse(node.func.value) in ("jax.random", "random", "jr")):
                found.setdefault(str(path.relative_to(REPO)), []).append(node.lineno)
    assert set(found) <= set(_PUBLIC_INT_KEYS), {k: v for k, v in found.items() if k not in _PUBLIC_INT_KEYS}
    secret_module = (REPO / "dpwave/privacy/secret.py").read_text()
    assert "wrap_key_data" in secret_module and "hmac" in secret_module
