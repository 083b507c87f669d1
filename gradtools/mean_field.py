"""Mean-field signal propagation: what theory predicts for a deep, wide fully connected net.

For weights of variance σ_w²/fan_in and biases of variance σ_b², the pre-activations of a wide
layer are Gaussian with a variance q that settles, layer after layer, at the fixed point
q* = σ_w² E[φ(√q* z)²] + σ_b² (z ~ N(0, 1); Poole et al. 2016). Back-propagated, the squared
gradient norm is multiplied per layer by χ₁ = σ_w² E[φ'(√q* z)²] (Schoenholz et al. 2017): below
1 the net is in the ordered phase and gradients vanish with depth, above 1 in the chaotic phase
and they explode; χ₁ = 1 is the critical line, the edge of chaos (for ReLU, σ_w² = 2: He's
initialization). Expectations are Gauss–Hermite sums.
"""

from __future__ import annotations

import math

import numpy as np

#: Gauss–Hermite nodes and weights for E[f(z)], z ~ N(0, 1) (probabilists' Hermite).
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(201)
_WEIGHTS = _WEIGHTS / math.sqrt(2 * math.pi)


def _sigmoid(h):
    return 0.5 * (1 + np.tanh(h / 2))


#: φ and φ' of the activations theory is computed for.
ACTIVATIONS = {
    "tanh": (np.tanh, lambda h: 1 - np.tanh(h) ** 2),
    "sigmoid": (_sigmoid, lambda h: _sigmoid(h) * (1 - _sigmoid(h))),
    "relu": (lambda h: np.maximum(h, 0.0), lambda h: (h > 0).astype(float)),
}


def _expected(f, q: float) -> float:
    return float(np.sum(_WEIGHTS * f(math.sqrt(q) * _NODES)))


def fixed_point_variance(activation: str, sigma_w2: float, sigma_b2: float = 0.0) -> float:
    """q*: the variance the pre-activations settle at (iterated from 1 until it stops moving;
    it may be 0, or grow without bound for an unbounded activation in the chaotic phase)."""
    phi, _ = ACTIVATIONS[activation]
    q = 1.0
    for _ in range(10_000):
        with np.errstate(over="ignore", invalid="ignore"):  # an unbounded φ in the chaotic phase
            new = sigma_w2 * _expected(lambda h: phi(h) ** 2, q) + sigma_b2
        if not math.isfinite(new) or abs(new - q) <= 1e-12 * max(1.0, q):
            return new
        q = new
    return q


def chi1(activation: str, sigma_w2: float, sigma_b2: float = 0.0) -> float:
    """χ₁ = σ_w² E[φ'(h)²] at the fixed point: the factor per layer of the squared gradient norm."""
    _, derivative = ACTIVATIONS[activation]
    q = fixed_point_variance(activation, sigma_w2, sigma_b2)
    if activation == "relu" or q <= 0:  # ReLU: φ'² is 1/2 of the mass at any q; q* = 0: φ'(0)²
        return float(sigma_w2 * (0.5 if activation == "relu" else derivative(np.array(0.0)) ** 2))
    return sigma_w2 * _expected(lambda h: derivative(h) ** 2, q)


def critical_sigma_w2(activation: str, sigma_b2: float = 0.0) -> float:
    """The σ_w² where χ₁ = 1 (bisection on log σ_w² between 10⁻² and 10⁴)."""
    low, high = math.log(1e-2), math.log(1e4)
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if chi1(activation, math.exp(middle), sigma_b2) < 1 else (low, middle)
    return math.exp((low + high) / 2)


def predicted_verdict(activation: str, depth: int, sigma_w2: float, sigma_b2: float = 0.0,
                      decades: float = 2.0) -> str:
    """Theory's verdict for ``depth`` layers: the gradient norm changes by √χ₁ per layer, so
    over the net by χ₁^(depth/2); vanishing when that is below 10^−decades, exploding when it
    is above 10^decades (the two decades of :data:`gradtools.diagnosis.VANISHING_RATIO` and
    :data:`gradtools.diagnosis.EXPLODING_DEPTH_GROWTH`), healthy between."""
    change = depth / 2 * math.log10(chi1(activation, sigma_w2, sigma_b2))
    return "vanishing" if change < -decades else "exploding" if change > decades else "healthy"
