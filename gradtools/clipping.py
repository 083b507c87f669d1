"""Gradient clipping as pure functions on lists of gradient tensors.

Each function takes the gradients of one step (``None`` entries pass through) and returns
the clipped list. A threshold to start from: :func:`gradtools.clip_suggestion.suggest_clip_norm`.
"""

from __future__ import annotations

import tensorflow as tf

from gradtools.stats import global_gradient_norm
from gradtools.validation import require_positive_number


def clip_by_value(gradients, clip_value: float, scale=1.0):
    """gᵢ ← min(max(gᵢ, −c), c) for every entry of every tensor (Keras's ``clipvalue``).
    With a loss ``scale`` s (mixed precision), gradients of s·loss are clipped at s·c."""
    require_positive_number("clip_value", clip_value)
    threshold = clip_value * scale
    return [None if g is None else tf.clip_by_value(g, -tf.cast(threshold, g.dtype), tf.cast(threshold, g.dtype))
            for g in gradients]


def clip_by_norm(gradients, clip_norm: float):
    """Each tensor on its own: if ‖g‖₂ ≥ c then g ← c·g/‖g‖₂ (Keras's ``clipnorm``)."""
    require_positive_number("clip_norm", clip_norm)
    return [None if g is None else tf.clip_by_norm(g, clip_norm) for g in gradients]


def clip_by_global_norm(gradients, clip_norm: float, scale=1.0):
    """All tensors together: if ‖g‖₂ ≥ c (g the concatenation of every gradient) then every
    tensor is scaled by c/‖g‖₂, which keeps the update's direction (Keras's
    ``global_clipnorm``; Pascanu et al. 2013). With a loss ``scale`` s (mixed precision),
    gradients of s·loss are clipped at s·c.

    Unlike ``tf.clip_by_global_norm``, which turns every gradient into NaN when ‖g‖₂
    overflows float32, an overflowing norm scales the step to zero."""
    require_positive_number("clip_norm", clip_norm)
    threshold = tf.cast(clip_norm * scale, tf.float32)
    factor = threshold / tf.maximum(global_gradient_norm(gradients), threshold)
    return [None if g is None else g * tf.cast(factor, g.dtype) for g in gradients]
