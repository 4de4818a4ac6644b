"""`dpwave.train.hashing`: canonical-JSON config fingerprints and parameter-tree digests."""
import hashlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpwave.train.hashing import config_fingerprint, params_sha256

pytestmark = pytest.mark.unit


def test_config_fingerprint_is_canonical():
    a = {"model": {"width": 256, "depth": 4}, "dp": {"sigma": 1.1}, "name": "x"}
    b = {"name": "x", "dp": {"sigma": 1.1}, "model": {"depth": 4, "width": 256}}
    assert config_fingerprint(a) == config_fingerprint(b)
    assert config_fingerprint(ml_collections.ConfigDict(a)) == config_fingerprint(a)
    assert config_fingerprint({**a, "name": "y"}) != config_fingerprint(a)
    canonical = '{"dp":{"sigma":1.1},"model":{"depth":4,"width":256},"name":"x"}'
    assert config_fingerprint(a) == hashlib.sha256(canonical.encode()).hexdigest()
    for bad in ({"x": float("nan")}, {"x": object()}, [1, 2]):
        with pytest.raises(ValueError):
            config_fingerprint(bad)


def test_params_sha256_follows_the_documented_format():
    params = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int32(7)}
    sha = hashlib.sha256()
    sha.update(b"float32[2,3]" + params["a"].tobytes())
    sha.update(b"int32[]" + params["b"].tobytes())
    assert params_sha256(params) == sha.hexdigest()
    assert params_sha256(jax.tree.map(jnp.asarray, params)) == sha.hexdigest()


def test_params_sha256_distinguishes_what_matters():
    w = np.arange(6, dtype=np.float32)
    base = params_sha256({"a": w.reshape(2, 3)})
    assert params_sha256({"renamed": w.reshape(2, 3)}) == base  # names are not hashed
    assert params_sha256({"a": w.reshape(3, 2)}) != base  # same bytes, other shape
    assert params_sha256({"a": w.view(np.int32).reshape(2, 3)}) != base  # same bytes, other dtype
    assert params_sha256({"a": w.astype(">f4").reshape(2, 3)}) == base  # byte order normalized
    t = w.reshape(2, 3).T
    assert params_sha256({"a": t}) == params_sha256({"a": np.ascontiguousarray(t)})  # C order
    w2 = w.copy()
    w2[5] = np.nextafter(w2[5], np.float32(10))
    assert params_sha256({"a": w2.reshape(2, 3)}) != base  # one ulp
    assert params_sha256([w[:3], w[3:]]) != params_sha256([w[3:], w[:3]])  # leaf order
    assert params_sha256({"k": jax.random.key(1)}) != params_sha256({"k": jax.random.key(2)})
    bf16 = params_sha256({"a": jnp.ones((2,), jnp.bfloat16)})
    assert bf16 != params_sha256({"a": jnp.ones((2,), jnp.float16)})
    with pytest.raises(ValueError, match="numeric"):
        params_sha256({"a": np.array(["x"], dtype=object)})
