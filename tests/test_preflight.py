"""gradtools.preflight: the verdict at initialization, from a few batches, on nets whose fate
is known (signal-propagation theory: ordered → vanishing, chaotic → exploding), on the
gallery's models (the verdict their training gets), and without changing the model."""

import keras
import numpy as np
import pytest
from conftest import assert_drawn_png

from experiments import gallery, zoo
from gradtools.diagnosis import EXPLODING_DEPTH_GROWTH, VANISHING_RATIO
from gradtools.preflight import preflight

DEPTH, WIDTH = 10, 32


def data(n=256, features=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    return x, (x[:, :1] > 0).astype("float32")


def mlp(activation, initializer, depth=DEPTH, output="sigmoid"):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((16,))]
        + [keras.layers.Dense(WIDTH, activation=activation, kernel_initializer=initializer, name=f"d{i}")
           for i in range(depth)]
        + [keras.layers.Dense(1, activation=output, name="head")])


def check(model, **kwargs):
    x, y = data()
    return preflight(model, x, y, loss="binary_crossentropy", optimizer=keras.optimizers.SGD(0.01), **kwargs)


def test_a_deep_sigmoid_net_at_small_init_vanishes_and_the_table_shows_the_decay(tmp_path):
    result = check(mlp("sigmoid", keras.initializers.RandomNormal(0.0, 0.1, seed=0)))
    assert result.verdict == "vanishing"
    assert result.evidence.weakest_depth_ratio < VANISHING_RATIO ** 3  # ten factors of σ' ≤ 1/4
    sensitivity = result.signal.set_index("block")["sensitivity"]
    assert (np.diff(sensitivity[[f"d{i}" for i in range(DEPTH)]].to_numpy()) > 0).all(), "grows toward the output"
    assert "at initialization" in result.explanation and "first epoch" not in result.explanation
    path = tmp_path / "signal.png"
    result.figure().savefig(path)
    assert_drawn_png(path)


def test_relu_at_scale_30_explodes_at_the_output_before_anything_else():
    """Logits around 10⁶ behind a sigmoid: the cause is named first."""
    result = check(mlp("relu", keras.initializers.VarianceScaling(30.0, seed=0), depth=12), batches=2)
    assert result.verdict == "exploding"
    assert result.evidence.output_logit_median_abs > 1e4 > result.evidence.output_logit_bound
    assert result.explanation.startswith("At initialization: Exploding gradients: exploding activations at the output")
    assert result.evidence.output_saturated == 1.0
    assert result.signal["mean_square"].iloc[-2] > 1e20  # the last hidden layer's output


@pytest.mark.parametrize("scale, verdict", [(30.0, "exploding"), (1.0, "healthy")])
def test_tanh_in_the_chaotic_phase_explodes_through_depth_and_at_lecun_scale_does_not(scale, verdict):
    """σ_w² = 30 is deep in tanh's chaotic phase (χ₁ > 1: the sensitivity grows by a factor per
    layer toward the input); σ_w² = 1 is at the edge of chaos without biases."""
    result = check(mlp("tanh", keras.initializers.VarianceScaling(scale, seed=0)))
    assert result.verdict == verdict, result.explanation
    growth = result.evidence.depth_growth
    assert growth >= EXPLODING_DEPTH_GROWTH if verdict == "exploding" else growth < EXPLODING_DEPTH_GROWTH / 10
    if verdict == "exploding":
        assert "through depth" in result.explanation
        assert result.signal["saturated"].iloc[:DEPTH].mean() > 0.5  # tanh units at ±1


def test_he_initialised_relu_is_healthy_and_nothing_the_model_or_optimizer_holds_changes():
    model = mlp("relu", keras.initializers.HeNormal(seed=0), depth=12)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    model.optimizer.build(model.trainable_variables)
    before = [v.numpy().copy() for v in (*model.variables, *model.optimizer.variables)]
    x, y = data()
    result = preflight(model, x, y)  # the compiled loss and optimizer
    assert result.verdict == "healthy", result.explanation
    assert 0 < result.layer_table()["update_ratio"].max() < 1e-2, "the first Adam step was measured"
    for kept, now in zip(before, (*model.variables, *model.optimizer.variables)):
        np.testing.assert_array_equal(kept, now.numpy(), err_msg=now.path)
    assert result.to_dict()["signal"][0]["block"] == "d0"


def test_batch_normalization_statistics_are_left_as_they_were():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
                              keras.layers.Activation("relu"), keras.layers.Dense(1, activation="sigmoid")])
    moving = [v.numpy().copy() for v in model.non_trainable_variables]
    check(model)
    for kept, now in zip(moving, model.non_trainable_variables):
        np.testing.assert_array_equal(kept, now.numpy())


def test_a_subclassed_model_gets_a_verdict_without_activation_statistics():
    class Tower(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = [keras.layers.Dense(WIDTH, activation="sigmoid", name=f"s{i}",
                                              kernel_initializer=keras.initializers.RandomNormal(0, 0.1, seed=i))
                           for i in range(8)]
            self.head = keras.layers.Dense(1, activation="sigmoid")

        def call(self, x):
            for layer in self.hidden:
                x = layer(x)
            return self.head(x)

    result = check(Tower())
    assert result.verdict == "vanishing"
    assert list(result.signal.columns) == ["block", "sensitivity"]


def test_the_gallery_models_get_at_initialization_the_verdict_training_gives_them():
    """Every gallery case, healthy and broken, with its own loss, optimizer and data."""
    said = {}
    for case in gallery.CASES:
        keras.utils.set_random_seed(0)
        model, x, y = case.build()
        model.compile(optimizer=case.compile["optimizer"](), loss=case.compile["loss"])
        said[case.name] = preflight(model, x, y, batch_size=case.batch_size).verdict
    assert said == {case.name: case.expected for case in gallery.CASES}


def test_a_loss_is_required_and_batches_must_be_whole_numbers():
    x, y = data()
    with pytest.raises(ValueError, match="needs a loss"):
        preflight(mlp("relu", "he_normal", depth=2), x, y)
    with pytest.raises(ValueError, match="batches"):
        preflight(mlp("relu", "he_normal", depth=2), x, y, loss="mse", batches=1.5)


def test_the_command_line_checks_a_saved_model_and_names_what_it_cannot_use(tmp_path):
    import json

    from conftest import run_cli

    model = mlp("sigmoid", keras.initializers.RandomNormal(0.0, 0.1, seed=0), depth=8)
    model.compile(optimizer="sgd", loss="binary_crossentropy")
    model.save(tmp_path / "model.keras")
    x, y = data()
    np.savez(tmp_path / "data.npz", x=x, y=y)
    said = run_cli(["preflight", "model.keras", "data.npz"], tmp_path, module="gradtools")
    assert said.returncode == 0, said.stderr
    assert said.stdout.startswith("verdict: vanishing") and "per block, in depth order" in said.stdout
    as_json = run_cli(["preflight", "model.keras", "data.npz", "--json"], tmp_path, module="gradtools")
    assert json.loads(as_json.stdout)["verdict"] == "vanishing"

    np.savez(tmp_path / "other.npz", inputs=x, y=y)
    wrong_key = run_cli(["preflight", "model.keras", "other.npz"], tmp_path, module="gradtools")
    assert wrong_key.returncode == 2 and wrong_key.stdout == ""
    assert wrong_key.stderr.strip() == ("error: other.npz: no array named 'x' (it holds inputs, y); "
                                        "name them with --x-key and --y-key")
    (tmp_path / "broken.keras").write_text("not a model")
    broken = run_cli(["preflight", "broken.keras", "data.npz"], tmp_path, module="gradtools")
    assert broken.returncode == 2 and broken.stderr.startswith("error: broken.keras: Keras cannot load it")
    assert "Traceback" not in broken.stderr


def test_the_suite_checks_its_configs_before_training_and_draws_their_signal(tmp_path):
    from conftest import assert_drawn_png, run_cli

    said = run_cli(["preflight", "vanishing_remedies/deep_sigmoid", "vanishing_remedies/he_relu",
                    "--figures", str(tmp_path / "out")], tmp_path)
    assert said.returncode == 0, said.stderr
    verdicts = dict(line.split() for line in said.stdout.splitlines() if not line.startswith("  "))
    assert verdicts == {"vanishing_remedies/deep_sigmoid": "vanishing", "vanishing_remedies/he_relu": "healthy"}
    assert_drawn_png(tmp_path / "out" / "preflight_vanishing_remedies_deep_sigmoid.png")
    bad = run_cli(["preflight", "vanishing/relu", "--set", "model.depth=0"], tmp_path)
    assert bad.returncode == 2 and "model.depth" in bad.stderr and bad.stdout == ""


def _hub_bert(hidden: int) -> keras.Model:
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=zoo.VOCAB, num_layers=2, num_heads=2, hidden_dim=hidden,
                                             intermediate_dim=4 * hidden, dropout=0.0,
                                             max_sequence_length=zoo.LENGTH)
    model = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2, preprocessor=None, dropout=0.0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


def test_keras_hubs_bert_at_a_real_width_is_healthy_and_its_encoders_share_grows_with_width():
    """keras-hub initialises every kernel at N(0, 0.02²), about Glorot's scale at BERT's width
    of 768; at width 16 that is 12× smaller, and the encoder's residual branches add about 0.5 %
    to the stream: its blocks get 0.005 of the head's sensitivity. At width 64 they get 0.05."""
    x, y = zoo._text_inputs(), zoo.labels()  # noqa: SLF001 - the zoo's inputs
    narrow, wide = (preflight(_hub_bert(hidden), x, y, batch_size=16, batches=2) for hidden in (16, 64))
    assert wide.verdict == "healthy", wide.explanation
    assert wide.evidence.weakest_depth_ratio > VANISHING_RATIO
    assert wide.evidence.weakest_depth_ratio > 4 * narrow.evidence.weakest_depth_ratio
