"""The experiments' networks, built from [model] sections: which layers, in which order, with
which initializers; residual and batch-normalized variants; traced recurrent nets."""

import dataclasses

import keras
import numpy as np

from experiments.config import load_config
from experiments.models import build_model
from gradtools.recurrence import spectral_radius
from gradtools.through_time import TracedRNN


def model_of(name, **changes):
    spec = load_config(name).model
    return build_model(dataclasses.replace(spec, **changes), input_shape=(2,))


def test_the_articles_vanishing_net_has_its_layers_and_initializers():
    model = model_of("vanishing/sigmoid_baseline")
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.name for layer in dense] == ["hidden_1", "hidden_2", "hidden_3", "output"]
    assert [layer.units for layer in dense] == [10, 10, 5, 1]
    for layer in dense:
        initializer = layer.kernel_initializer
        assert isinstance(initializer, keras.initializers.RandomUniform), layer.name
        assert (initializer.minval, initializer.maxval) == (-1, 1), layer.name
        kernel = layer.kernel.numpy()
        assert kernel.min() >= -1 and kernel.max() <= 1, "U(-1, 1)"
        assert layer.activation is keras.activations.sigmoid
    # U(-1, 1) has standard deviation 1/sqrt(3) = 0.577; 100 draws land within 0.1 of it
    assert abs(dense[1].kernel.numpy().std() - 3 ** -0.5) < 0.1


def test_residual_batch_norm_and_prelu_variants_put_their_layers_where_they_say():
    residual = model_of("vanishing_remedies/residual")
    adds = [layer.name for layer in residual.layers if isinstance(layer, keras.layers.Add)]
    assert adds == [f"skip_{k}" for k in range(2, 9)], "from the second hidden layer on"
    before = model_of("vanishing_remedies/batchnorm_before_activation")
    names = [layer.name for layer in before.layers]
    assert names.index("hidden_1") < names.index("batch_norm_1") < names.index("activation_1")
    assert names.index("activation_1") < names.index("hidden_2")
    on_input = model_of("vanishing/batchnorm")
    assert [layer.name for layer in on_input.layers][1] == "input_batch_norm"
    prelu = model_of("vanishing_remedies/prelu")
    assert sum(isinstance(layer, keras.layers.PReLU) for layer in prelu.layers) == 8


def test_recurrent_nets_are_traced_and_start_at_the_spectral_radius_asked_for():
    config = load_config("rnn/simple_rnn_t50")
    model = build_model(config.model, input_shape=(50, 2))
    traced = [layer for layer in model.layers if isinstance(layer, TracedRNN)]
    assert traced and all(layer.truncate_bptt is None for layer in traced)
    radius = spectral_radius(traced[0].inner_cell.recurrent_kernel.numpy())
    assert np.isclose(radius, config.model.recurrent_spectral_radius, rtol=1e-4)
    truncated = load_config("rnn/lstm_t50_truncated")
    layer = next(layer for layer in build_model(truncated.model, (50, 2)).layers if isinstance(layer, TracedRNN))
    assert layer.truncate_bptt == truncated.model.truncate_bptt and layer.bptt_steps == layer.truncate_bptt + 1
