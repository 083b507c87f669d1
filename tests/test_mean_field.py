"""Mean-field theory's χ₁ against what is known in closed form and against a wide random net
measured here (not by the code under test)."""

import numpy as np
import pytest

from gradtools.mean_field import chi1, critical_sigma_w2, predicted_verdict


@pytest.mark.parametrize("sigma_w2", [0.3, 1.0, 2.0, 6.0])
def test_relu_halves_the_squared_gradient_per_unit_of_weight_variance(sigma_w2):
    assert chi1("relu", sigma_w2) == pytest.approx(sigma_w2 / 2)


def test_tanh_without_biases_is_critical_at_lecun_scale_and_he_init_is_critical_for_relu():
    assert chi1("tanh", 0.5) == pytest.approx(0.5)  # q* = 0, tanh'(0) = 1
    assert critical_sigma_w2("tanh") == pytest.approx(1.0, rel=1e-2)
    assert critical_sigma_w2("relu") == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("activation, sigma_w2", [("sigmoid", 10.0), ("tanh", 4.0), ("sigmoid", 100.0)])
def test_chi1_is_the_squared_gradient_change_per_layer_of_a_wide_random_net(activation, sigma_w2):
    """A 2000-wide, 30-deep random net: after 10 layers to reach the fixed point, the
    back-propagated gradient's squared norm changes by χ₁ per layer (geometric mean)."""
    rng = np.random.default_rng(0)
    width, depth = 2000, 30
    phi = np.tanh if activation == "tanh" else lambda h: 1 / (1 + np.exp(-h))
    derivative = (lambda h: 1 - np.tanh(h) ** 2) if activation == "tanh" else lambda h: phi(h) * (1 - phi(h))
    weights = [rng.normal(0, np.sqrt(sigma_w2 / width), (width, width)) for _ in range(depth)]
    x, pre = rng.normal(size=width), []
    for w in weights:
        pre.append(w @ x)
        x = phi(pre[-1])
    g = rng.normal(size=width)
    norms = []
    for w, h in zip(reversed(weights), reversed(pre)):
        g = w.T @ (g * derivative(h))
        norms.append(np.sum(g ** 2))
    measured = np.exp(np.mean(np.diff(np.log(norms[: depth - 10]))))  # the layers past the transient
    assert measured == pytest.approx(chi1(activation, sigma_w2), rel=0.05)


def test_theory_calls_depth_vanishing_or_exploding_at_two_decades():
    assert predicted_verdict("relu", 16, 1.0) == "vanishing"  # (1/2)^8 = 0.004
    assert predicted_verdict("relu", 12, 2.0) == "healthy"
    assert predicted_verdict("relu", 8, 10.0) == "exploding"  # 5^4 = 625
