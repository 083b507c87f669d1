"""Every shipped config loads; every kind of bad config is refused with exit code 2, a message
naming the file, key and value, and no run directory."""

import pytest

from experiments.cli import main
from experiments.config import ConfigError, config_names, load_config, parse_override

ARTICLE_CONFIGS = {
    "vanishing/sigmoid_baseline", "vanishing/relu", "vanishing/shallow",
    "vanishing/glorot_uniform", "vanishing/adam", "vanishing/batchnorm",
    "exploding/relu_baseline", "exploding/grad_clipping", "exploding/glorot_tanh",
    "exploding/l2_regularization",
}

GOOD = """
[experiment]
name = "tiny"
group = "test"

[data]
generator = "moons"
n_samples = 64
noise = 0.1
random_state = 0

[model]
hidden_units = [4]
activation = "sigmoid"
output_activation = "sigmoid"

[optimizer]
class_name = "RMSprop"

[training]
loss = "binary_crossentropy"
epochs = 1
"""


def test_article_configs_all_load_with_their_article_parameters():
    assert ARTICLE_CONFIGS <= set(config_names())
    for name in ARTICLE_CONFIGS:
        config = load_config(name)
        assert config.run_name == name
        assert config.training.batch_size == 32
        assert config.training.epochs == 100
    exploding = load_config("exploding/relu_baseline").model
    assert exploding.kernel_initializer["config"] == {"minval": 4.0, "maxval": 5.0}
    assert exploding.output_kernel_initializer == "glorot_uniform"
    vanishing = load_config("vanishing/sigmoid_baseline").model
    assert vanishing.output_kernel_initializer == vanishing.kernel_initializer
    assert load_config("vanishing/batchnorm").model.batch_norm == "input"
    assert load_config("vanishing/relu").model.batch_norm is None, '"none" in TOML is None'
    assert load_config("exploding/grad_clipping").optimizer.config == {"clipvalue": 50.0}


def test_overrides_are_toml_values_and_bare_words_are_strings():
    assert parse_override("training.epochs=20") == (["training", "epochs"], 20)
    assert parse_override("model.activation=relu") == (["model", "activation"], "relu")
    assert parse_override("model.hidden_units=[3, 3]") == (["model", "hidden_units"], [3, 3])
    config = load_config("vanishing/relu", ["training.epochs=7", "optimizer.config.learning_rate=0.5"])
    assert config.training.epochs == 7
    assert config.optimizer.config == {"learning_rate": 0.5}


@pytest.mark.parametrize("text", ["training.epochs", "training..epochs=5", ".epochs=3", "=3"])
def test_an_override_that_is_not_key_equals_value_says_so(text):
    """'training..epochs=5' was an unknown key 'training. = {'epochs': 5}'."""
    with pytest.raises(ConfigError) as raised:
        parse_override(text)
    assert str(raised.value) == f"--set: --set = {text!r}: must be KEY=VALUE with a dotted key, e.g. training.epochs=20"


BAD = [
    # (what is wrong, replace this, with this, words the message must contain)
    ("unknown section", "[training]", "[trainig]\nepochs = 1\n[training]", ["[trainig]", "allowed sections"]),
    ("unknown key", "epochs = 1", "epochs = 1\nepochz = 3", ["training.epochz", "3", "allowed in [training]"]),
    ("wrong type", "epochs = 1", 'epochs = "ten"', ["training.epochs", "'ten'", "integer from 1 to"]),
    ("out of range", "epochs = 1", "epochs = 1\nbatch_size = 0", ["training.batch_size", "0", "from 1 to"]),
    ("unknown activation", 'activation = "sigmoid"', 'activation = "sigmoidd"',
     ["model.activation", "'sigmoidd'", "known names", "tanh"]),
    ("unknown initializer", "hidden_units = [4]", 'hidden_units = [4]\nkernel_initializer = "glorot_unifrom"',
     ["model.kernel_initializer", "glorot_unifrom", "glorot_uniform"]),
    ("unknown optimizer", 'class_name = "RMSprop"', 'class_name = "RMSpropp"', ["optimizer", "RMSpropp", "RMSprop"]),
    ("bad optimizer argument", 'class_name = "RMSprop"', 'class_name = "RMSprop"\nconfig = { learnin_rate = 1.0 }',
     ["optimizer", "learnin_rate"]),
    ("unknown loss", 'loss = "binary_crossentropy"', 'loss = "binary_crosentropy"',
     ["training.loss", "binary_crosentropy"]),
    ("bad generator parameter", "noise = 0.1", "noise = -1.0", ["data.noise", "-1.0"]),
    ("unknown generator parameter", "noise = 0.1", "noise = 0.1\nn_feature = 3",
     ["data.n_feature", "allowed", "noise"]),
    ("missing key", "hidden_units = [4]\n", "", ["model.hidden_units", "required"]),
    ("malformed TOML", "epochs = 1", "epochs = = 1", ["not valid TOML", "line"]),
    ("rnn on tabular data", "hidden_units = [4]", 'hidden_units = [4]\narchitecture = "rnn"',
     ["model.architecture", "'rnn'", "sequence data", "adding"]),
    ("rnn key on an mlp", "hidden_units = [4]", 'hidden_units = [4]\nrecurrent_cell = "LSTM"',
     ["model.recurrent_cell", "'LSTM'", "only for model.architecture = 'rnn'"]),
    ("unknown recurrent cell", "hidden_units = [4]",
     'hidden_units = [4]\narchitecture = "rnn"\nrecurrent_cell = "LTSM"',
     ["model.recurrent_cell", "'LTSM'", "'SimpleRNN'", "'GRU'"]),
    ("residual widths differ", "hidden_units = [4]",
     'hidden_units = [4, 5, 6]\narchitecture = "residual_mlp"',
     ["model.hidden_units", "[4, 5, 6]", "same number of units"]),
    ("sequence data for an mlp", 'generator = "moons"\nn_samples = 64\nnoise = 0.1',
     'generator = "adding"\nn_samples = 64\nsequence_length = 3', ["data.sequence_length", "3", "[4, 1000]"]),
    ("bad depth", "hidden_units = [4]", 'hidden_units = [4]\ndepth = 0',
     ["model.depth", "0", "from 1 to 200"]),
    ("depth a typo would hang on", "hidden_units = [4]", 'hidden_units = [4]\ndepth = 1000000000',
     ["model.depth", "1000000000", "from 1 to 200"]),
    ("optimizer argument of the wrong type", 'class_name = "RMSprop"', 'class_name = "RMSprop"\nconfig = { rho = "x" }',
     ["optimizer.config", "rho = 'x': must be a number"]),
    ("initializer argument of the wrong type", "hidden_units = [4]",
     'hidden_units = [4]\nkernel_initializer = { class_name = "RandomUniform", config = { minval = "abc" } }',
     ["model.kernel_initializer", "minval = 'abc': must be a number"]),
    # Keras takes these unchecked: "false" was true, a negative momentum trained
    ("a flag given as text", 'loss = "binary_crossentropy"',
     'loss = { class_name = "BinaryCrossentropy", config = { from_logits = "false" } }',
     ["training.loss", "from_logits = 'false': must be true or false"]),
    ("negative momentum", 'class_name = "RMSprop"', 'class_name = "SGD"\nconfig = { momentum = -0.9 }',
     ["optimizer.config", "momentum = -0.9: must be a number >= 0"]),
    ("minval above maxval", "hidden_units = [4]",
     'hidden_units = [4]\nkernel_initializer = { class_name = "RandomUniform", config = '
     '{ minval = 2.0, maxval = 1.0 } }',
     ["model.kernel_initializer", "minval = 2.0 is above maxval = 1.0"]),
    ("negative Huber delta", 'loss = "binary_crossentropy"',
     'loss = { class_name = "Huber", config = { delta = -1.0 } }',
     ["training.loss", "delta = -1.0: must be a number > 0"]),
    ("a flag as a count", "n_samples = 64", "n_samples = true", ["data.n_samples", "True", "from 1 to 10000000"]),
    ("more examples than memory", "n_samples = 64", "n_samples = 10000000000",
     ["data.n_samples", "10000000000", "from 1 to 10000000"]),
    ("a count TensorFlow cannot hold", "epochs = 1", "epochs = 1\nlog_every = 1180591620717411303424",
     ["training.log_every", "from 1 to 2147483647"]),
    ("more layers than Keras can walk", "hidden_units = [4]", "hidden_units = [4]\ndepth = 990",
     ["model.depth", "990", "from 1 to 200"]),
    ("3000 hidden layers listed", "hidden_units = [4]", "hidden_units = [" + ", ".join(["4"] * 3000) + "]",
     ["model.hidden_units", "a list of 1 to 200 integers"]),
    ("class labels standardized", "noise = 0.1", "noise = 0.1\nstandardize_targets = true",
     ["data.standardize_targets", "True", "real-valued targets", "'moons'"]),
    ("bad batches in a shuffled epoch", "noise = 0.1", "noise = 0.1\ncorrupt_batches = [1]",
     ["data.corrupt_batches", "[1]", "needs training.shuffle = false"]),
    ("an unknown spike action", "epochs = 1", 'epochs = 1\nspike_guard = "ignore"',
     ["training.spike_guard", "'ignore'", "'warn'", "'rollback'"]),
]


@pytest.mark.parametrize("what, old, new, words", BAD, ids=[case[0] for case in BAD])
def test_bad_config_exits_2_naming_file_key_and_value(tmp_path, capsys, what, old, new, words):
    assert old in GOOD
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace(old, new, 1))
    out = tmp_path / "runs"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and str(path) in message
    for word in words:
        assert word in message, (word, message)
    assert not out.exists(), "a refused config must leave no run directory"


@pytest.mark.parametrize("what, old, new, words", [
    ("generator parameters each fine but not together", 'generator = "moons"\nn_samples = 64\nnoise = 0.1',
     'generator = "classification"\nn_samples = 64\nn_features = 2\nn_informative = 3',
     ["data.generator = 'classification'", "informative"]),
    ("constant targets to standardize", 'generator = "moons"\nn_samples = 64\nnoise = 0.1',
     'generator = "regression"\nn_samples = 64\nn_informative = 0\nnoise = 0.0\nstandardize_targets = true',
     ["data.standardize_targets = True", "same value"]),
])
def test_what_validation_cannot_see_without_the_data_is_refused_before_the_run_writes(tmp_path, capsys, what, old,
                                                                                       new, words):
    """Validation checks values without making the data (load_config accepts these); the run
    makes it once, and refuses it before it writes anything."""
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace(old, new, 1).replace('output_activation = "sigmoid"', 'output_activation = "linear"')
                    .replace('"binary_crossentropy"', '"mse"'))
    load_config(str(path))
    assert main(["run", str(path), "--out", str(tmp_path / "runs"), "--quiet"]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and str(path) in message and message.count("\n") == 1, message
    for word in words:
        assert word in message, (word, message)
    assert not (tmp_path / "runs").exists()


def test_a_bad_batch_past_the_epochs_end_is_named(tmp_path, capsys):
    path = tmp_path / "late.toml"
    path.write_text(GOOD.replace("noise = 0.1", "noise = 0.1\ncorrupt_batches = [2, 4]")
                    .replace("epochs = 1", "epochs = 1\nshuffle = false\nbatch_size = 16"))
    assert main(["run", str(path), "--out", str(tmp_path / "runs"), "--quiet"]) == 2
    message = capsys.readouterr().err
    assert "data.corrupt_batches = [2, 4]" in message
    assert "an epoch has 4 full batches of 16 (64 examples): batch 4 is not one of them" in message


def test_spectral_radius_needs_a_square_recurrent_kernel(tmp_path, capsys):
    path = tmp_path / "lstm.toml"
    path.write_text(GOOD.replace('generator = "moons"\nn_samples = 64\nnoise = 0.1',
                                 'generator = "adding"\nn_samples = 64\nsequence_length = 8')
                    .replace("hidden_units = [4]", 'hidden_units = [4]\narchitecture = "rnn"\n'
                             'recurrent_cell = "LSTM"\nrecurrent_spectral_radius = 1.1'))
    assert main(["run", str(path), "--out", str(tmp_path / "runs"), "--quiet"]) == 2
    message = capsys.readouterr().err
    assert "model.recurrent_spectral_radius = 1.1" in message and "square" in message
    assert not (tmp_path / "runs").exists()


def test_the_good_config_of_those_cases_runs(tmp_path, capsys):
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    assert main(["run", str(path), "--out", str(tmp_path / "runs"), "--quiet"]) == 0
    assert "run: " in capsys.readouterr().out


def test_missing_file_and_bad_override_exit_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "runs")]) == 2
    message = capsys.readouterr().err
    assert "nope.toml" in message and "vanishing/sigmoid_baseline" in message
    assert main(["run", "vanishing/relu", "--set", "training.epochs=-2", "--out", str(tmp_path / "runs")]) == 2
    message = capsys.readouterr().err
    assert "--set training.epochs=-2" in message and "training.epochs = -2" in message
    assert main(["run", "vanishing/relu", "--set", "epochs=2", "--out", str(tmp_path / "runs")]) == 2
    assert "sections" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_config_error_message_format():
    error = ConfigError("a.toml", "training.epochs", 0, "must be an integer >= 1")
    assert str(error) == "a.toml: training.epochs = 0: must be an integer >= 1"


def test_the_config_reference_page_is_generated_from_the_sections(repo_root):
    from experiments.config import SECTIONS, config_reference

    page = (repo_root / "docs" / "config.md").read_text()
    assert page == config_reference(), "regenerate: python -m experiments config-reference > docs/config.md"
    for name in SECTIONS:
        assert f"## [{name}]" in page
    assert '| `clip_global_norm` | `"none"` |' in page and "| `epochs` | required |" in page


def test_a_config_saved_with_a_byte_order_mark_and_a_set_nested_past_reading(tmp_path, capsys):
    """A BOM (as some Windows editors save) is read, not 'Invalid statement'; a --set value
    nested 3000 levels is one line, exit 2 (a RecursionError traceback before)."""
    path = tmp_path / "bom.toml"
    path.write_bytes("\ufeff".encode() + GOOD.encode())
    assert load_config(str(path)).name == "tiny"
    assert main(["run", str(path), "--set", "training.epochs=" + "[" * 3000 + "]" * 3000,
                 "--out", str(tmp_path / "out")]) == 2
    assert "nests tables or arrays too deeply to read" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_learning_rate_schedule_in_the_optimizer_config(tmp_path, capsys):
    """A Keras schedule given as a table trains (it was a 5-line Keras message, exit 2); an
    unknown one is one line naming the schedules."""
    import keras

    schedule = '{ class_name = "ExponentialDecay", config = { initial_learning_rate = 0.1, decay_steps = 10, ' \
               'decay_rate = 0.9 } }'
    path = tmp_path / "scheduled.toml"
    text = GOOD.replace('class_name = "RMSprop"', f'class_name = "SGD"\nconfig = {{ learning_rate = {schedule} }}')
    path.write_text(text)
    optimizer = keras.optimizers.get(load_config(str(path)).optimizer.keras_config())
    assert optimizer.get_config()["learning_rate"]["class_name"] == "ExponentialDecay"
    path.write_text(path.read_text().replace("ExponentialDecay", "ExponentialDecy"))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not a Keras learning-rate schedule; schedules: " in lines[0], lines
    assert "ExponentialDecay" in lines[0]
