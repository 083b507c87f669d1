"""Experiment config files: TOML read with ``tomllib``, validated at the boundary.

Every problem is reported as a :class:`ConfigError` naming the file, the key, the value and
what is allowed. Keras names (initializers, activations, optimizers, regularizers, losses)
are checked by asking Keras's own registries to resolve them. Validation makes no data and
trains nothing: the data generators' parameters are checked against their declared
constraints; what only making the data or using the optimizer shows is a ConfigError from
:func:`config_data` and :func:`config_optimizer`, which a run calls once, before it writes
anything.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from experiments.datasets import (
    GENERATORS,
    REAL_TARGET_GENERATORS,
    SEQUENCE_GENERATORS,
    check_data_params,
    make_dataset,
)
from gradtools.spike_events import ACTIONS as SPIKE_ACTIONS
from gradtools.validation import MAX_COUNT, MAX_SEED, is_integer, is_number

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
BATCH_NORM_PLACES = ("none", "input", "before_activation")
ARCHITECTURES = ("mlp", "residual_mlp", "rnn")
RECURRENT_CELLS = ("SimpleRNN", "LSTM", "GRU")
#: A learnable activation: a layer (keras.layers.PReLU), not a function in keras.activations.
PRELU = "prelu"
#: [model] keys that only an RNN uses.
RNN_KEYS = ("recurrent_cell", "recurrent_initializer", "recurrent_spectral_radius", "truncate_bptt")


class ConfigError(ValueError):
    """A config that cannot be run. ``str()`` is the message to show the user."""

    def __init__(self, source: str, key: str, value: Any, allowed: str):
        self.source, self.key, self.value, self.allowed = source, key, value, allowed
        if key == FILE:
            super().__init__(f"{source}: {allowed}")
        else:
            shown = "(missing)" if value is _MISSING else repr(value)
            super().__init__(f"{source}: {key} = {shown}: {allowed}")


_MISSING = object()
FILE = "(file)"  # the key of an error about the whole file
#: TOML has no null: a config says "none" where the value is absent; it is None once read.
NONE = "none"


#: The deepest net a config may ask for: Keras walks a model's graph recursively and fails
#: past about 950 layers, and XLA took over 400 s to compile an epoch of 900 (a typo of 10⁹
#: layers would hang building it).
MAX_DEPTH = 200


# --- value checks: each returns the (normalized) value or raises ValueError(allowed) ----------

def _integer(minimum: int, maximum: int = MAX_COUNT) -> Callable[[Any], int]:
    def check(value):
        if not is_integer(value, minimum, maximum):
            raise ValueError(f"must be an integer from {minimum} to {maximum}")
        return value
    return check


def _number(minimum: float | None = None, exclusive: bool = False) -> Callable[[Any], float]:
    def check(value):
        if not is_number(value):
            raise ValueError("must be a finite number (not nan or inf)")
        if not is_number(value, minimum, exclusive):
            raise ValueError(f"must be a number {'>' if exclusive else '>='} {minimum}")
        return value
    return check


def _boolean(value):
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _optional_text(value):
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _name(value):
    if not isinstance(value, str) or not value or not all(c.isalnum() or c in "_-" for c in value):
        raise ValueError("must be a non-empty name of letters, digits, '_' or '-'")
    return value


def _text_list(value):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    return tuple(value)


def _units(value):
    if (not isinstance(value, list) or not value or len(value) > MAX_DEPTH
            or not all(is_integer(v, 1, MAX_COUNT) for v in value)):
        raise ValueError(f"must be a list of 1 to {MAX_DEPTH} integers >= 1, e.g. [10, 10, 5]")
    return tuple(value)


def _choice(*allowed: str) -> Callable[[Any], str | None]:
    """One of ``allowed``; ``"none"``, when allowed, is None."""
    def check(value):
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(repr(a) for a in allowed)}")
        return None if value == NONE else value
    return check


def _public_names(module) -> str:
    names = sorted(n for n in dir(module) if n.islower() and not n.startswith("_")
                   and n not in ("get", "serialize", "deserialize", "legacy", "schedules"))
    return ", ".join(names)


def _keras_object(kind: str, registry: str, optional: bool = False):
    """Accepts what ``keras.<registry>.get`` resolves: a name or ``{class_name = "...",
    config = {...}}``. Keras (and with it TensorFlow) is imported at the first check, so the
    commands that read no config (``--help``, ``dashboard``) start without it."""
    def check(value):
        import keras

        module = getattr(keras, registry)
        if optional and value == NONE:
            return None
        if not isinstance(value, (str, dict)):
            raise ValueError(f"must be a Keras {kind} name or {{class_name = ..., config = {{...}}}}")
        if isinstance(value, dict) and set(value) - {"class_name", "config"}:
            raise ValueError(f"a table for a Keras {kind} has only the keys class_name and config")
        try:
            resolved = module.get(copy.deepcopy(value))
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"not a Keras {kind} ({error_first_line(error)}); known names: {_public_names(module)}"
            ) from None
        if resolved is None:
            raise ValueError(f"must name a Keras {kind}")
        if isinstance(value, dict):
            check_keras_arguments(type(resolved), value.get("config") or {})
        if registry == "initializers" and isinstance(value, dict):
            _once(value, lambda: resolved((2, 2)), "Keras cannot make weights with it")
        return value
    return check


#: Keras arguments that are sizes, rates or coefficients: a negative one is a typo.
NON_NEGATIVE = ("momentum", "weight_decay", "epsilon", "rho", "beta_1", "beta_2", "clipnorm", "clipvalue",
                "global_clipnorm", "stddev", "scale", "l1", "l2", "label_smoothing", "gain")


def _real(value) -> bool:
    """A real number, nan and inf included (a NaN initializer is an experiment of its own)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_keras_arguments(cls, arguments: Mapping[str, Any]) -> None:
    """Keras takes its objects' arguments unchecked (``from_logits = "false"`` is true,
    ``momentum = -0.9`` trains): each argument must be of the kind of the class's default
    (true or false for a flag, a number for a number), a size or rate not negative, Huber's
    ``delta`` above 0 and ``minval`` at most ``maxval``. ValueError names the argument."""
    try:
        defaults = cls().get_config()
    except Exception:  # noqa: BLE001 - a class that needs arguments: its own checks apply
        defaults = {}
    for name, value in arguments.items():
        default = defaults.get(name)
        if name == "learning_rate" and isinstance(value, dict):  # a schedule: Keras reads it
            _learning_rate_schedule(value)
            continue
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{name} = {value!r}: must be true or false")
        if isinstance(default, (int, float)) and not isinstance(default, bool) and not _real(value):
            raise ValueError(f"{name} = {value!r}: must be a number")
        if name in NON_NEGATIVE and is_number(value) and value < 0:
            raise ValueError(f"{name} = {value!r}: must be a number >= 0")
    if is_number(arguments.get("delta")) and arguments["delta"] <= 0:
        raise ValueError(f"delta = {arguments['delta']!r}: must be a number > 0")
    low, high = arguments.get("minval"), arguments.get("maxval")
    if is_number(low) and is_number(high) and low > high:
        raise ValueError(f"minval = {low!r} is above maxval = {high!r}")


def _learning_rate_schedule(value: dict) -> None:
    """``{class_name = "ExponentialDecay", config = {...}}``: one that Keras can make."""
    import keras

    names = ", ".join(n for n in dir(keras.optimizers.schedules) if n[:1].isupper() and n != "LearningRateSchedule")
    try:
        schedule = keras.optimizers.schedules.deserialize(copy.deepcopy(value))
    except Exception as error:  # noqa: BLE001 - Keras raises TypeError, ValueError, KeyError
        raise ValueError(f"learning_rate = {value!r}: not a Keras learning-rate schedule "
                         f"({error_first_line(error)}); schedules: {names}") from None
    if not isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):  # an unknown name comes back
        raise ValueError(f"learning_rate = {value!r}: not a Keras learning-rate schedule; schedules: {names}")


#: The Keras objects this process saw work (as JSON): a sweep's points share most of them.
_WORKED: set[str] = set()


def _once(value, use: Callable[[], Any], failure: str) -> None:
    """``use()`` the object ``value`` describes, once per process for each value: Keras reads
    most arguments only then (a string minval or beta_1, say). ValueError when it fails."""
    seen = json.dumps(value, sort_keys=True, default=str)
    if seen in _WORKED:
        return
    try:
        use()
    except Exception as error:  # noqa: BLE001 - TensorFlow's errors, TypeError, ValueError
        raise ValueError(f"{failure} ({error_first_line(error)})") from None
    _WORKED.add(seen)


def error_first_line(error: Exception) -> str:
    """An error's first line (Keras's and TensorFlow's messages run to many)."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*$", "", line)  # TensorFlow's op names


_initializer = _keras_object("initializer", "initializers")
_activation = _keras_object("activation", "activations")


def _hidden_activation(value):
    if value == PRELU:
        return value
    try:
        return _activation(value)
    except ValueError as error:
        raise ValueError(f"{error}; or {PRELU!r} (a learnable keras.layers.PReLU)") from None
_regularizer = _keras_object("regularizer", "regularizers", optional=True)
_loss = _keras_object("loss", "losses")


def _optional_count(value):
    if value == NONE:
        return None
    try:
        return _integer(1)(value)
    except ValueError:
        raise ValueError('must be an integer >= 1 or "none"') from None



def _optional_depth(value):
    if value == NONE:
        return None
    try:
        return _integer(1, MAX_DEPTH)(value)
    except ValueError:
        raise ValueError(f'must be an integer from 1 to {MAX_DEPTH} or "none"') from None


def _optional_positive(value):
    if value == NONE:
        return None
    return _number(0, exclusive=True)(value)


def _clip_norm(value):
    if value == "suggested":
        return value
    try:
        return _optional_positive(value)
    except ValueError:
        raise ValueError('must be a number > 0, "suggested" or "none"') from None


def _batch_indices(value):
    if not isinstance(value, list) or not all(is_integer(v, 0, MAX_COUNT) for v in value):
        raise ValueError("must be a list of batch indices (integers >= 0), e.g. [40, 90]")
    return tuple(value)


def _optimizer_class(value):
    if not isinstance(value, str):
        raise ValueError("must be a Keras optimizer class name such as 'SGD', 'RMSprop', 'Adam'")
    return value


def _table(value):
    if not isinstance(value, dict):
        raise ValueError("must be a table, e.g. {learning_rate = 0.01}")
    return value


def key(check: Callable[[Any], Any], default: Any = _MISSING, doc: str = ""):
    """A config key: the check that validates (and normalizes) its value, its default and
    what it means (shown in docs/config.md)."""
    metadata = {"check": check, "doc": doc, "default": default}
    if default is _MISSING:
        return field(metadata=metadata)
    if isinstance(default, dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ExperimentSection:
    """[experiment]: what the run is called and where it goes."""

    name: str = key(_name, doc="the run directory's name")
    group: str = key(_name, "ungrouped", "runs are written to `<out>/<group>/<name>/`")
    description: str = key(_optional_text, "", "one sentence: what this experiment changes")
    tags: tuple[str, ...] = key(_text_list, (), "labels for the run (Neptune tags)")
    article_name: str = key(_optional_text, "", "the model's name in the article's script")


@dataclass(frozen=True)
class DataSection:
    """[data]: a scikit-learn generator (or the adding problem) and its parameters."""

    generator: str = key(_choice(*GENERATORS), doc="moons, circles, classification, regression "
                         "(scikit-learn's make_*) or adding (the adding problem)")
    standardize: bool = key(_boolean, False, "scale inputs to zero mean, unit variance")
    standardize_targets: bool = key(_boolean, False, "scale the targets too (generators with real-valued "
                                    "targets only: regression, adding)")
    corrupt_batches: tuple[int, ...] = key(_batch_indices, (), "bad batches: with training.shuffle = false, these "
                                           "batches (0-based) of every epoch get their targets multiplied by "
                                           "corrupt_scale (after standardizing)")
    corrupt_scale: float = key(_number(0, exclusive=True), 1000.0, "what corrupt_batches' targets are multiplied by")
    #: The generator's own keyword parameters (n_samples, noise, random_state, …).
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSection:
    """[model]: the network."""

    hidden_units: tuple[int, ...] = key(_units, doc="widths of the hidden layers, e.g. [10, 10, 5]")
    activation: Any = key(_hidden_activation, doc=f"the hidden layers' Keras activation, or {PRELU!r}")
    architecture: str = key(_choice(*ARCHITECTURES), "mlp",
                            "mlp; residual_mlp (x + f(x) around every hidden layer after the first); "
                            "rnn (recurrent layers of hidden_units, then the output layer)")
    depth: int | None = key(_optional_depth, None,
                            f"when set: depth hidden layers (at most {MAX_DEPTH}) of hidden_units[0] units each")
    output_units: int = key(_integer(1), 1, "units of the output layer")
    output_activation: Any = key(_activation, "linear", "the output layer's Keras activation")
    kernel_initializer: Any = key(_initializer, "glorot_uniform", "the hidden layers' Keras initializer")
    output_kernel_initializer: Any = key(_initializer, "glorot_uniform", "the output layer's Keras initializer")
    batch_norm: str | None = key(_choice(*BATCH_NORM_PLACES), None,
                                 "none; input (after the input); before_activation (every hidden layer)")
    kernel_regularizer: Any = key(_regularizer, None, "hidden layers only: a Keras regularizer")
    activity_regularizer: Any = key(_regularizer, None, "hidden layers only: a Keras regularizer")
    recurrent_cell: str = key(_choice(*RECURRENT_CELLS), "SimpleRNN", "rnn only")
    recurrent_initializer: Any = key(_initializer, "orthogonal", "rnn only")
    recurrent_spectral_radius: float | None = key(_optional_positive, None,
                                                  "rnn, SimpleRNN only: rescale the initial recurrent "
                                                  "kernel to this spectral radius")
    truncate_bptt: int | None = key(_optional_count, None,
                                    "rnn only: the gradient flows only this many steps back")

    @property
    def hidden_layer_units(self) -> list[int]:
        """The hidden layers' widths: ``hidden_units``, or ``depth`` × ``hidden_units[0]``."""
        return [self.hidden_units[0]] * self.depth if self.depth is not None else list(self.hidden_units)


@dataclass(frozen=True)
class OptimizerSection:
    """[optimizer]: a Keras optimizer by class name and its arguments."""

    class_name: str = key(_optimizer_class, doc="a Keras optimizer class: SGD, RMSprop, Adam, …")
    config: Mapping[str, Any] = key(_table, {}, "its arguments, e.g. {learning_rate = 0.01, clipnorm = 1.0}")

    def keras_config(self) -> dict[str, Any]:
        """What ``keras.optimizers.get`` takes (a fresh copy: Keras may change it). A
        learning-rate schedule given as ``{class_name, config}`` is one of Keras's: Keras finds
        it by its module."""
        config = copy.deepcopy(dict(self.config))
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = {"module": "keras.optimizers.schedules", "registered_name": None,
                                       **config["learning_rate"]}
        return {"class_name": self.class_name, "config": config}


@dataclass(frozen=True)
class TrainingSection:
    """[training]: the loop."""

    loss: Any = key(_loss, doc="a Keras loss name or config")
    epochs: int = key(_integer(1), doc="passes over the data")
    batch_size: int = key(_integer(1), 32, "examples per step (more than the data: one batch of all of it)")
    seed: int = key(_integer(0, MAX_SEED), 42, "seeds Python, NumPy and TensorFlow; same seed, same numbers")
    shuffle: bool = key(_boolean, True, "reshuffle the examples every epoch")
    log_every: int = key(_integer(1), 1, "record every k-th step (and every non-finite one)")
    stop_on_nonfinite: bool = key(_boolean, True, "stop at the first NaN/Inf loss or gradient")
    clip_value: float | None = key(_optional_positive, None, "clip each gradient entry to [-c, c]")
    clip_global_norm: float | str | None = key(_clip_norm, None, 'a number, or "suggested": the mean '
                                               "global norm of 20 probe steps")
    spike_guard: str | None = key(_choice(*SPIKE_ACTIONS, NONE), None,
                                  "none, or what a gradtools.SpikeGuard does about a spike: "
                                  + ", ".join(SPIKE_ACTIONS))


#: The sections of a config file, in order.
SECTIONS = {"experiment": ExperimentSection, "data": DataSection, "model": ModelSection,
            "optimizer": OptimizerSection, "training": TrainingSection}


def _keys(section: type) -> list:
    """The fields of a section that a config file sets (not ``params``)."""
    return [f for f in fields(section) if "check" in f.metadata]


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated config, every default filled in. Immutable: :meth:`replace` makes another."""

    source: str
    experiment: ExperimentSection
    data: DataSection
    model: ModelSection
    optimizer: OptimizerSection
    training: TrainingSection

    @property
    def name(self) -> str:
        return self.experiment.name

    @property
    def group(self) -> str:
        return self.experiment.group

    @property
    def run_name(self) -> str:
        """``<group>/<name>``: the experiment's name in run.json, figures and loggers."""
        return f"{self.group}/{self.name}"

    @property
    def seed(self) -> int:
        return self.training.seed

    def replace(self, section: str, **changes) -> "ExperimentConfig":
        """A copy with ``changes`` to one section (already valid values)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The config as config.toml holds it (None values left out: TOML has no null), as
        new tables: changing them leaves the config as it is."""
        tables = {}
        for name in SECTIONS:
            section = getattr(self, name)
            table = {f.name: getattr(section, f.name) for f in _keys(type(section))}
            if name == "data":
                table.update(section.params)
            tables[name] = copy.deepcopy(table)
        if self.model.architecture != "rnn":  # a config that gives them is refused: so is one that shows them
            for key in RNN_KEYS:
                tables["model"].pop(key)
        return tables


def find_config(reference: str | Path) -> Path:
    """A config given as a path, or as ``group/name`` under ``configs/``."""
    path = Path(reference)
    candidates = [path, CONFIGS_DIR / path, CONFIGS_DIR / path.with_suffix(".toml")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = ", ".join(config_names()) or "none"
    raise ConfigError(str(reference), FILE, str(reference),
                      f"no such config file; available: {available}")


#: Folders under ``configs/`` that hold something other than experiment configs.
NOT_EXPERIMENTS = ("sweeps",)


def config_names() -> list[str]:
    """``group/name`` of every experiment config under ``configs/``."""
    return sorted(str(p.relative_to(CONFIGS_DIR).with_suffix("")) for p in CONFIGS_DIR.rglob("*.toml")
                  if p.relative_to(CONFIGS_DIR).parts[0] not in NOT_EXPERIMENTS)


def config_groups() -> list[str]:
    """The groups (folders) of the experiment configs, article's first."""
    found = {name.split("/")[0] for name in config_names()}
    article = [g for g in ("vanishing", "exploding") if g in found]
    return article + sorted(found - set(article))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``training.epochs=20`` -> (["training", "epochs"], 20). The value is read as TOML;
    a bare word that is not TOML (``relu``) is taken as a string."""
    key, separator, raw = text.partition("=")
    if not separator or not all(part.strip() for part in key.split(".")):
        raise ConfigError("--set", "--set", text, "must be KEY=VALUE with a dotted key, e.g. training.epochs=20")
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    except RecursionError:
        raise ConfigError("--set", "--set", text[:80] + "…", "nests tables or arrays too deeply to read") from None
    return key.strip().split("."), value


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's tables; a file that cannot be read or parsed is a :class:`ConfigError`."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM, as some editors save
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(str(path), FILE, "", f"is not valid TOML: {error}") from None
    except RecursionError:
        raise ConfigError(str(path), FILE, "", "nests tables or arrays too deeply to read") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(str(path), FILE, "", f"cannot be read: {error}") from None


def load_config(reference: str | Path, overrides: list[str] = (),
                settings: Mapping[str, Any] | None = None, settings_from: str = "") -> ExperimentConfig:
    """Read, override and validate one config. Raises :class:`ConfigError`.

    ``overrides`` are ``--set`` texts (``training.epochs=20``); ``settings`` are dotted keys
    with values already parsed (a sweep's point), applied after them; an error in one of them
    is blamed on ``settings_from`` (e.g. ``sweeps/x.toml [grid]``)."""
    path = find_config(reference)
    source = str(path)
    raw = read_toml(path)
    overridden: dict[str, str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(raw, keys, value, f"{source} (--set {text})")
        overridden[".".join(keys)] = f"--set {text}"
    for key, value in (settings or {}).items():
        shown = f"{settings_from} {key} = {value!r}".strip()
        # a copy: the same value object must not be shared (and later changed) by two configs
        _apply_override(raw, key.split("."), copy.deepcopy(value), f"{source} ({shown})")
        overridden[key] = shown
    try:
        return ExperimentConfig(source, **validate(raw, source))
    except ConfigError as error:
        # A bad value that came from the command line is blamed on the --set that gave it.
        given_by = next((text for key, text in overridden.items()
                         if key == error.key or key.startswith(error.key + ".")), None)
        if given_by is None:
            raise
        raise ConfigError(f"{source} ({given_by})", error.key, error.value,
                          error.allowed) from None


def _apply_override(raw: dict, keys: list[str], value: Any, source: str) -> None:
    if len(keys) < 2 or keys[0] not in SECTIONS:
        raise ConfigError(source, ".".join(keys), value,
                          f"a key is <section>.<key>, sections: {', '.join(SECTIONS)}")
    table = raw
    for part in keys[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(source, ".".join(keys), value, f"{part} is not a table")
    table[keys[-1]] = value


def validate(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check every section and key; return each section's values, defaults filled in."""
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        section = sorted(unknown)[0]
        raise ConfigError(source, f"[{section}]", raw[section],
                          f"unknown section; allowed sections: {', '.join(SECTIONS)}")
    values: dict[str, Any] = {}
    for name, section in SECTIONS.items():
        given = raw.get(name, {})
        if not isinstance(given, dict):
            raise ConfigError(source, f"[{name}]", given, "must be a table")
        extra = dict(given)
        checked = {f.name: _checked(extra, f, f"{name}.{f.name}", source) for f in _keys(section)}
        if name == "data":
            checked["params"] = _data_params(extra, checked["generator"], source,
                                             checked["standardize_targets"])
        elif extra:
            key_name = sorted(extra)[0]
            raise ConfigError(source, f"{name}.{key_name}", extra[key_name],
                              f"unknown key; allowed in [{name}]: {', '.join(f.name for f in _keys(section))}")
        values[name] = section(**checked)
    _check_optimizer(values["optimizer"], source)
    _check_model(values, raw.get("model", {}), source)
    _check_corruption(values, source)
    return values


def _check_corruption(values: dict[str, Any], source: str) -> None:
    """Bad batches are batches of the epoch's order: there is one only without shuffling,
    and each must be one of the epoch's full batches."""
    data, training = values["data"], values["training"]
    if not data.corrupt_batches:
        return
    if training.shuffle:
        raise ConfigError(source, "data.corrupt_batches", list(data.corrupt_batches),
                          "needs training.shuffle = false (with shuffling, a batch holds other examples every epoch)")
    n_samples = data.params.get("n_samples")
    if isinstance(n_samples, int):
        full = n_samples // training.batch_size
        late = [b for b in data.corrupt_batches if b >= full]
        if late:
            raise ConfigError(source, "data.corrupt_batches", list(data.corrupt_batches),
                              f"an epoch has {full} full batches of {training.batch_size} ({n_samples} examples): "
                              f"batch {late[0]} is not one of them")


def _checked(given: dict[str, Any], spec, dotted: str, source: str) -> Any:
    """The value of one key (taken out of ``given``), checked, or its default."""
    value = given.pop(spec.name, _MISSING)
    if value is _MISSING:
        if spec.metadata["default"] is _MISSING:
            raise ConfigError(source, dotted, _MISSING, "is required")
        return copy.deepcopy(spec.metadata["default"])
    try:
        return spec.metadata["check"](value)
    except ValueError as error:
        raise ConfigError(source, dotted, value, str(error)) from None


def _check_model(values: dict[str, Any], given: Mapping[str, Any], source: str) -> None:
    """Keys that only make sense together."""
    model, generator = values["model"], values["data"].generator
    architecture = model.architecture
    if architecture == "rnn":
        if generator not in SEQUENCE_GENERATORS:
            raise ConfigError(source, "model.architecture", architecture,
                              f"an rnn needs sequence data: data.generator one of "
                              f"{', '.join(SEQUENCE_GENERATORS)}")
        if model.batch_norm is not None:
            raise ConfigError(source, "model.batch_norm", model.batch_norm, "must be 'none' for an rnn")
        if model.activation == PRELU:
            raise ConfigError(source, "model.activation", PRELU, "an rnn cell needs a Keras activation")
        if model.recurrent_spectral_radius is not None and model.recurrent_cell != "SimpleRNN":
            raise ConfigError(source, "model.recurrent_spectral_radius", model.recurrent_spectral_radius,
                              "only a SimpleRNN has a square recurrent kernel; use 'none'")
        return
    if generator in SEQUENCE_GENERATORS:
        raise ConfigError(source, "data.generator", generator,
                          f"gives sequences; it needs model.architecture = 'rnn' (is {architecture!r})")
    for name in RNN_KEYS:
        if name in given:
            raise ConfigError(source, f"model.{name}", given[name],
                              f"only for model.architecture = 'rnn' (is {architecture!r})")
    units = model.hidden_layer_units
    if architecture == "residual_mlp" and len(set(units[1:])) > 1:
        raise ConfigError(source, "model.hidden_units", list(model.hidden_units),
                          "a residual_mlp adds each layer's input to its output, so every hidden "
                          "layer after the first needs the same number of units")


def _data_params(params: dict[str, Any], generator: str, source: str,
                 standardize_targets: bool = False) -> dict[str, Any]:
    if standardize_targets and generator not in REAL_TARGET_GENERATORS:
        raise ConfigError(source, "data.standardize_targets", True,
                          f"only for generators with real-valued targets ({', '.join(REAL_TARGET_GENERATORS)}): "
                          f"the {generator!r} generator's targets are class labels")
    try:
        check_data_params(generator, params)
    except KeyError as error:
        key, allowed = error.args
        raise ConfigError(source, f"data.{key}", params[key],
                          f"unknown key for the {generator!r} generator; allowed: {allowed}") from None
    except ValueError as error:
        raise _data_error(error, generator, params, source) from None
    return params


def _data_error(error: ValueError, generator: str, params: dict[str, Any], source: str) -> ConfigError:
    """A generator's refusal as a ConfigError naming the parameter its message names."""
    key = next((k for k in params if f"'{k}'" in str(error)), "generator")
    return ConfigError(source, f"data.{key}", params.get(key, generator), str(error))


def config_data(config: "ExperimentConfig") -> tuple[Any, Any]:
    """The config's data, made (once, by the run that uses it). Validation checks each value
    without making the data; what only making it shows is a ConfigError here, before the run
    writes anything."""
    data = config.data
    try:
        return make_dataset(data)
    except ZeroDivisionError:
        raise ConfigError(config.source, "data.standardize_targets", True,
                          "the targets all have the same value: they cannot be scaled to unit "
                          "variance; set it to false or change the data") from None
    except ValueError as error:
        raise _data_error(error, data.generator, data.params, config.source) from None


def _check_optimizer(section: OptimizerSection, source: str) -> None:
    """The optimizer's class and arguments, as values: Keras makes and uses it in
    :func:`config_optimizer`, when the run starts."""
    import keras

    for name, value in section.config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(source, f"optimizer.config.{name}", value, "must be a finite number")
    rate = section.config.get("learning_rate")
    if is_number(rate) and rate <= 0:
        raise ConfigError(source, "optimizer.config.learning_rate", rate, "must be a number > 0")
    cls = {name.lower(): getattr(keras.optimizers, name) for name in _optimizer_names()}.get(section.class_name.lower())
    if cls is None:  # Keras takes the class name in any case ("adam")
        raise ConfigError(source, "optimizer", section.keras_config(), f"Keras has no optimizer class "
                          f"{section.class_name!r}; classes: {', '.join(_optimizer_names())}")
    try:  # its arguments, before Keras reads them its own way
        check_keras_arguments(cls, section.config)
    except ValueError as error:
        raise ConfigError(source, "optimizer.config", section.config, str(error)) from None


def _optimizer_names() -> list[str]:
    """The optimizer classes a config may name (not the base class, nor the wrappers)."""
    import keras

    wrappers = ("Optimizer", "LossScaleOptimizer", "MultiOptimizer", "OptimizerMap")
    return [name for name in dir(keras.optimizers)
            if name[:1].isupper() and isinstance(getattr(keras.optimizers, name), type) and name not in wrappers]


def config_optimizer(config: "ExperimentConfig"):
    """The config's optimizer, made, and used once on a variable of its own (Keras reads most
    arguments only then: a learning-rate schedule's, say): a ConfigError here, when the run
    starts and before it writes anything, rather than a Keras traceback mid-run."""
    import keras

    section = config.optimizer
    try:
        optimizer = keras.optimizers.get(section.keras_config())
    except (ValueError, TypeError) as error:
        raise ConfigError(config.source, "optimizer", section.keras_config(), "Keras cannot make an optimizer of "
                          f"it ({error_first_line(error)}); classes: {', '.join(_optimizer_names())}") from None

    def one_update():
        keras.optimizers.get(section.keras_config()).apply([keras.ops.zeros(2)], [keras.Variable(keras.ops.zeros(2))])

    try:
        _once(section.keras_config(), one_update, "Keras cannot train with it")
    except ValueError as error:
        raise ConfigError(config.source, "optimizer.config", section.config, str(error)) from None
    return optimizer


def config_reference() -> str:
    """docs/config.md: every section and key with its default and meaning, from the sections'
    own fields (``python -m experiments config-reference`` prints it)."""
    lines = ["# Config reference", "",
             "Generated from `experiments/config.py` by `python -m experiments config-reference`; "
             "a test keeps this page equal to it. A config is a TOML file with these sections; "
             '`"none"` stands for no value (TOML has no null). `--set section.key=value` '
             "overrides any key.", ""]
    for name, section in SECTIONS.items():
        about = section.__doc__.split(": ", 1)[-1].strip()
        lines += [f"## [{name}]", "", about[0].upper() + about[1:], "",
                  "| key | default | meaning |", "|---|---|---|"]
        for spec in _keys(section):
            default = spec.metadata["default"]
            shown = "required" if default is _MISSING else f"`{_toml_text(default)}`"
            lines.append(f"| `{spec.name}` | {shown} | {spec.metadata['doc']} |")
        if name == "data":
            lines.append("| *others* | | the generator's own parameters, e.g. `n_samples`, `noise`, "
                         "`random_state` (checked by the generator) |")
        lines.append("")
    return "\n".join(lines)


def _toml_text(value: Any) -> str:
    if value is None:
        return f'"{NONE}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_text(v)}" for k, v in value.items()) + "}"
    return f'"{value}"' if isinstance(value, str) else str(value)
