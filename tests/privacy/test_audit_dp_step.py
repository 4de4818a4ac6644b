"""One-run audit (Steinke, Nasr & Jagielski 2023) of the DP stage's own jitted step on the AR transformer.

The step is built as the DP stage builds it: `steps.dp_step(...)` with the clipped sum and
the optimizer of a `privacy.DpSgdMechanism` (inner `optax.sgd`), on a 1-device data mesh, fed the padded Poisson
batches of
`privacy.PoissonSampler`, once with per-example gradients (vmap) and once with ghost norms. The model is a small
`transformer.ARTransformer`; the per-example loss is `transformer.per_example_loss` plus white-box gradient
canary terms, which are zero for the real examples.

Canary i adds `scale * W[r_i, c_i]` to its loss, for a coordinate of its own, with `scale` = 1e4 times the
clip norm, so its clipped gradient is C e_(r_i, c_i) up to 1e-4 of the model's own gradient. Half of the
canaries sit in `fc1.kernel`, which the ghost path handles as a dense weight: the term is written
`(scale e_r) W e_c`, a dot_general of W in the layout of the layer's own use, so the weight stays on the
ghost route and its norms and sums stay exact (indexing W would move it to the fallback). The other half
sit in `token_embed`, which the ghost path handles as a table of row lookups: the term reads row r_i, as the
model's own token lookups do, then its entry c_i, in rows of tokens no sequence contains, so no real
gradient lands there. Each canary is in the private set with probability
1/2; its score is how far its coordinate moved against its term (the summed normalized noisy gradient).
The normalizer is the expected batch size of the expected set, so it does not depend on the coins.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dpwave import privacy
from dpwave.models import transformer as transformer_lib
from dpwave.privacy import audit, ghost
from dpwave.train import distributed, steps

pytestmark = pytest.mark.integration

CONFIG = transformer_lib.TransformerConfig(vocab_size=64, seq_len=8, width=16, depth=1, num_heads=2, mlp_dim=64,
                                           num_classes=4)
SEQ_TOKENS = 8  # all sequences use token ids < 8: token_embed rows >= 8 get no gradient but the canaries'
DENSE = ("blocks", 0, "mlp", "fc1", "kernel")
TABLE = ("token_embed",)
CANARY_SCALE = 1e4
DELTA = 1e-5


@dataclasses.dataclass(frozen=True)
class Setting:
    steps: int
    sampling_prob: float
    num_real: int
    num_canaries: int  # half dense, half table
    num_guess: int  # guesses "in" and as many "out"
    microbatch_size: int
    target_epsilon: float = 2.0
    l2_clip: float = 1.0
    learning_rate: float = 1e-2

    @property
    def noise_multiplier(self) -> float:
        return privacy.calibrate_noise(self.target_epsilon, DELTA, self.sampling_prob, self.steps)

    def epsilon(self) -> float:
        """The accounted epsilon of the honest run (PLD, add or remove one)."""
        return privacy.epsilon(self.noise_multiplier, self.sampling_prob, self.steps, DELTA)


def _leaf(params, path: tuple) -> jax.Array | None:
    for name in path:
        params = params[name]
    return params.get_value()


def canary_loss(graphdef: nnx.GraphDef):
    """`loss(params, example, key)`: the transformer's per-example loss plus the example's canary terms.

    `example["scale"]` (2,) weights the dense and the table term; `example["at"]` (2, 2) holds their
    (row, column).
    """

    def loss(params, example, key):
        tokens = {"tokens": example["tokens"], "label": example["label"]}
        kernel, table = _leaf(params, DENSE), _leaf(params, TABLE)
        (dr, dc), (tr, tc) = example["at"][0], example["at"][1]
        row = example["scale"][0] * jax.nn.one_hot(dr, kernel.shape[0], dtype=kernel.dtype)
        dense = jnp.dot(jnp.dot(row, kernel), jax.nn.one_hot(dc, kernel.shape[1], dtype=kernel.dtype))
        canary = dense + example["scale"][1] * jnp.take(table, tr, axis=0)[tc]  # a row lookup, then its entry
        return transformer_lib.per_example_loss(graphdef, params, tokens, key) + canary

    return loss


def canary_data(seed: int, setting: Setting) -> tuple[dict, np.ndarray, np.ndarray]:
    """(the private set: real examples then the included canaries, canary coordinates (m, 2, 2), coins (m,))."""
    rng = np.random.default_rng(seed)
    n, m, half = setting.num_real, setting.num_canaries, setting.num_canaries // 2
    width, hidden = CONFIG.width, CONFIG.mlp_dim
    dense = rng.choice(width * hidden, half, replace=False)
    table = SEQ_TOKENS * width + rng.choice((CONFIG.vocab_size - SEQ_TOKENS) * width, m - half, replace=False)
    at = np.zeros((m, 2, 2), np.int32)
    at[:half, 0] = np.stack(np.divmod(dense, hidden), axis=1)
    at[half:, 1] = np.stack(np.divmod(table, width), axis=1)
    scale = np.zeros((m, 2), np.float32)
    scale[:half, 0] = scale[half:, 1] = CANARY_SCALE * setting.l2_clip
    included = rng.random(m) < 0.5
    examples = {"tokens": rng.integers(0, SEQ_TOKENS, (n + m, CONFIG.seq_len), dtype=np.int32),
                "label": rng.integers(0, CONFIG.num_classes, n + m, dtype=np.int32),
                "scale": np.concatenate([np.zeros((n, 2), np.float32), scale]),
                "at": np.concatenate([np.zeros((n, 2, 2), np.int32), at])}
    keep = np.concatenate([np.ones(n, bool), included])
    return {k: v[keep] for k, v in examples.items()}, at, included


def train_and_score(seed: int, setting: Setting, noise_multiplier: float,
                    use_ghost_norms: bool) -> tuple[np.ndarray, np.ndarray]:
    """Runs the stage's DP step over `setting.steps` Poisson batches; (canary scores, coins)."""
    examples, at, included = canary_data(seed, setting)
    graphdef, params = nnx.split(transformer_lib.ARTransformer(CONFIG, rngs=nnx.Rngs(seed)), nnx.Param)
    mesh = distributed.make_data_mesh(jax.devices()[:1])
    sampler = privacy.PoissonSampler(len(examples["label"]), setting.sampling_prob, seed=seed,
                                  bucket_multiple=setting.microbatch_size)
    # Accounted over the expected set (the real examples and half the canaries): a normalizer free of the coins.
    mechanism = privacy.DpSgdMechanism(setting.l2_clip, privacy.DpParams(
        noise_multiplier, setting.sampling_prob, DELTA, dataset_size=setting.num_real + setting.num_canaries // 2))
    optimizer = mechanism.optimizer(optax.sgd(setting.learning_rate), *privacy.DpSecret(seed, 256).noise_keys())
    trainable = transformer_lib.trainable_mask(params, "all")
    clipped_sum = mechanism.clipped_sum(canary_loss(graphdef), microbatch_size=setting.microbatch_size,
                                        trainable=trainable, use_ghost_norms=use_ghost_norms)
    step_fn = steps.dp_step(clipped_sum, optimizer, mesh, trainable=trainable)
    state = steps.TrainState(jax.tree.map(jnp.copy, params), optimizer.init(privacy.partition(params, trainable)[0]))
    state = distributed.replicate(state, mesh)
    key = jax.random.key(seed + 1)
    for i in range(setting.steps):
        indices, mask = sampler.batch(i)
        batch = distributed.shard_batch({k: v[indices] for k, v in examples.items()}, mesh)
        state, _ = step_fn(state, batch, distributed.shard_batch(mask, mesh), key, i)
    moved = [np.asarray(_leaf(params, p) - _leaf(state.params, p)) / setting.learning_rate for p in (DENSE, TABLE)]
    half = setting.num_canaries // 2
    scores = np.array([moved[i >= half][tuple(at[i, int(i >= half)])] for i in range(setting.num_canaries)])
    return scores, included


def run_audit(seed: int, setting: Setting, noise_multiplier: float, use_ghost_norms: bool) -> audit.AuditResult:
    scores, included = train_and_score(seed, setting, noise_multiplier, use_ghost_norms)
    return audit.one_run_audit(scores, included, num_pos=setting.num_guess, num_neg=setting.num_guess, delta=DELTA)


def test_canary_terms_take_the_dense_and_the_row_lookup_ghost_routes():
    setting = Setting(steps=1, sampling_prob=0.5, num_real=2, num_canaries=4, num_guess=1, microbatch_size=4)
    examples, _, _ = canary_data(0, setting)
    graphdef, params = nnx.split(transformer_lib.ARTransformer(CONFIG, rngs=nnx.Rngs(0)), nnx.Param)
    keys = jax.random.split(jax.random.key(0), len(examples["label"]))
    fallback = jax.eval_shape(
        lambda: ghost.ghost_norms(canary_loss(graphdef), params, jax.tree.map(jnp.asarray, examples), keys)
        .fallback_grads)
    assert _leaf(fallback, DENSE) is None  # dense: exact ghost norm and sum, no per-example gradient
    assert _leaf(fallback, TABLE) is None  # row lookups: the same


QUICK = Setting(steps=200, sampling_prob=0.1, num_real=100, num_canaries=200, num_guess=50, microbatch_size=64)


def test_ghost_step_audits_below_its_epsilon_and_catches_a_tenth_of_the_noise():
    sigma, eps = QUICK.noise_multiplier, QUICK.epsilon()
    honest = run_audit(1, QUICK, sigma, use_ghost_norms=True)
    assert honest.epsilon_lower_bound < eps
    broken = run_audit(1, QUICK, sigma / 10, use_ghost_norms=True)
    assert broken.epsilon_lower_bound > eps


BIG = Setting(steps=500, sampling_prob=0.05, num_real=500, num_canaries=1000, num_guess=200, microbatch_size=16)


@pytest.mark.slow
def test_both_clipping_paths_audit_alike():
    # The stage's microbatching (a scan over chunks of 16, two padded shapes), 1,000 canaries, 400 guesses.
    sigma, eps = BIG.noise_multiplier, BIG.epsilon()
    for factor, below in ((1, True), (10, False)):
        runs = [train_and_score(2, BIG, sigma / factor, use_ghost_norms) for use_ghost_norms in (False, True)]
        np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=0, atol=1e-4)
        for scores, coins in runs:
            result = audit.one_run_audit(scores, coins, num_pos=BIG.num_guess, num_neg=BIG.num_guess, delta=DELTA)
            assert (result.epsilon_lower_bound < eps) == below
