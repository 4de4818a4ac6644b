import jax
import numpy as np
import pytest
from flax import nnx

from dpwave.evaluate.classifier import (
    Classifier, TrainConfig, accuracy, classifier_features, loss_fn, train_classifier)

pytestmark = pytest.mark.unit


def _leaves(model):
    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_heldout_classifier_generalizes_to_real_test(mnist, heldout_classifier):
    # Trained on 500 held-out digits only; chance is 0.1.
    assert accuracy(heldout_classifier, *mnist["test"]) > 0.85


def test_features_are_penultimate_and_batch_invariant(mnist, heldout_classifier):
    images = mnist["test"][0][:40]
    feats = classifier_features(heldout_classifier, images, batch_size=40)
    assert feats.shape == (40, 128) and np.all(np.isfinite(feats)) and np.all(feats >= 0)  # after ReLU
    np.testing.assert_allclose(classifier_features(heldout_classifier, images, batch_size=16), feats,
                               rtol=1e-5, atol=1e-6)
    logits = feats @ np.asarray(heldout_classifier.head.kernel[...]) + np.asarray(heldout_classifier.head.bias[...])
    np.testing.assert_allclose(logits, np.asarray(heldout_classifier(images / 127.5 - 1.0)), rtol=1e-4, atol=1e-4)


def test_training_is_deterministic_from_the_seed(mnist):
    images, labels = mnist["public"][0][::6], mnist["public"][1][::6]  # 250, all classes
    config = TrainConfig(epochs=2, seed=3)
    a = train_classifier(images, labels, num_classes=10, config=config)
    b = train_classifier(images, labels, num_classes=10, config=config)
    c = train_classifier(images, labels, num_classes=10, config=TrainConfig(epochs=2, seed=4))
    for x, y in zip(_leaves(a.model), _leaves(b.model)):
        np.testing.assert_array_equal(x, y)
    assert a.history == b.history
    assert not all(np.array_equal(x, z) for x, z in zip(_leaves(a.model), _leaves(c.model)))


def test_validation_selects_the_best_epoch(mnist):
    images, labels = mnist["public"][0][::6], mnist["public"][1][::6]  # 250, all classes
    fit = train_classifier(images, labels, num_classes=10, config=TrainConfig(epochs=4, seed=0),
                           validation=mnist["heldout"])
    accs = [h["val_accuracy"] for h in fit.history]
    assert fit.best_epoch == 1 + int(np.argmax(accs))
    assert accuracy(fit.model, *mnist["heldout"]) == accs[fit.best_epoch - 1]


def test_model_is_usable_functionally_for_per_example_grads():
    model = Classifier((8, 8, 1), 3, width=4, feature_dim=8, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = np.random.default_rng(0).uniform(-1, 1, size=(4, 8, 8, 1)).astype(np.float32)
    y = np.array([0, 1, 2, 1])
    per_example_grads = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, None, None, 0, 0)), static_argnums=1)
    per_example = per_example_grads(params, graphdef, rest, x[:, None], y[:, None])
    batch = jax.jit(jax.grad(loss_fn), static_argnums=1)(params, graphdef, rest, x, y)
    for pe, full in zip(jax.tree.leaves(per_example), jax.tree.leaves(batch)):
        assert pe.shape == (4,) + full.shape
        np.testing.assert_allclose(np.asarray(pe).mean(0), np.asarray(full), rtol=1e-4, atol=1e-6)


def test_bad_inputs_raise(mnist, heldout_classifier):
    images, labels = mnist["heldout"]
    with pytest.raises(ValueError, match="expects"):
        classifier_features(heldout_classifier, np.zeros((2, 28, 28, 1), np.uint8))
    with pytest.raises(ValueError, match="num_classes is 5"):
        train_classifier(images, labels, num_classes=5)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="must lie in"):
        classifier_features(heldout_classifier, np.full((2, 32, 32, 1), 3.0, np.float32))
    with pytest.raises(ValueError, match="H>=8"):
        Classifier((4, 4, 1), 10, rngs=nnx.Rngs(0))
