"""The models of the conformance zoo (:mod:`experiments.conformance`), tiny and randomly
initialised, dropout 0, each on data made here whose last batch is smaller than the others.

- keras-hub task models built from their constructors (no download, ``preprocessor=None``):
  BERT, DeBERTa-v3, DistilBERT, GPT-2, Llama, Gemma, ViT and ResNet;
- ``keras.applications`` at 32×32: MobileNetV2, EfficientNetB0, DenseNet121, ResNet50V2;
- keras-io examples: the transformer text classifier, a VAE and a GAN with their own
  ``train_step``, the LSTM seq2seq, a wide-and-deep model with two inputs and two outputs;
- the nets of the failures the zoo was made for: a Dense layer on a sequence, twelve ReLU
  layers at ``VarianceScaling(30)`` under a sigmoid or softmax output, a ReLU regressor on
  scikit-learn's ``make_friedman1`` under a MirroredStrategy.

Each builder seeds Keras first, so two calls give the same weights.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from experiments.conformance import FLOAT16_TOLERANCE, Case, Subject

ROWS, BATCH = 40, 16  # three steps: 16, 16 and 8 rows
VOCAB, LENGTH = 64, 8


def _rng(seed=0):
    return np.random.default_rng(seed)


def tokens(rows=ROWS, padded=True, seed=0):
    """Token ids in [1, VOCAB), the tail of each row padded with 0, and the padding mask."""
    ids = _rng(seed).integers(1, VOCAB, size=(rows, LENGTH)).astype(np.int32)
    lengths = _rng(seed + 1).integers(3, LENGTH + 1, size=rows) if padded else np.full(rows, LENGTH)
    mask = np.arange(LENGTH)[None, :] < lengths[:, None]
    return np.where(mask, ids, 0), mask


def labels(rows=ROWS, classes=2, seed=2):
    return _rng(seed).integers(0, classes, size=rows).astype(np.int32)


def images(rows=ROWS, size=32, seed=3):
    return _rng(seed).uniform(0, 1, size=(rows, size, size, 3)).astype(np.float32)


def _compiled(model, loss, optimizer=None, **compile_kwargs):
    optimizer = compile_kwargs.pop("optimizer", optimizer)
    model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-3), loss=loss, **compile_kwargs)
    return model


# --- the nets of the failures this zoo was made for ------------------------------------------

def dense_on_sequence(**compile_kwargs) -> Subject:
    """A Dense layer applied to a sequence: its kernel's gradient has no static row count
    when the last batch is smaller."""
    keras.utils.set_random_seed(0)
    model = _compiled(keras.Sequential([keras.Input((LENGTH, 4)), keras.layers.Dense(3)]), "mse",
                      keras.optimizers.SGD(0.05), **compile_kwargs)
    x = _rng().normal(size=(ROWS, LENGTH, 4)).astype(np.float32)
    return Subject(model, x, _rng(1).normal(size=(ROWS, LENGTH, 3)).astype(np.float32), BATCH, fit_loss="mse")


def relu12_scale30(output="sigmoid", from_logits=False, one_hot=False, **compile_kwargs) -> Subject:
    """Twelve ReLU layers at VarianceScaling(30): logits around 10⁶ at init, where Keras's
    cross-entropy works from the logits and the loss is about 10⁶ (not a clipped 7)."""
    keras.utils.set_random_seed(0)
    units = 1 if output in ("sigmoid", "linear") else 3
    activation = None if from_logits else output
    layers = [keras.layers.Dense(16, activation="relu", kernel_initializer=keras.initializers.VarianceScaling(30))
              for _ in range(12)]
    model = keras.Sequential([keras.Input((10,)), *layers, keras.layers.Dense(units, activation=activation)])
    x = _rng().normal(size=(ROWS, 10)).astype(np.float32)
    if units == 1:
        y, loss = (x[:, 0] > 0).astype(np.float32), keras.losses.BinaryCrossentropy(from_logits=from_logits)
    else:
        y = labels(classes=3)
        if one_hot:
            y, loss = np.eye(3, dtype=np.float32)[y], keras.losses.CategoricalCrossentropy(from_logits=from_logits)
        else:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    model = _compiled(model, loss, keras.optimizers.SGD(1e-9), **compile_kwargs)
    return Subject(model, x, y, BATCH, fit_loss=loss)


def friedman_regressor(strategy=None, rows=999, batch=32, regularized=False) -> Subject:
    """4 × 64 ReLU regressor on make_friedman1, Adam; under a MirroredStrategy its last
    batch (7 rows) splits unevenly over two replicas. ``regularized``: each hidden layer's
    weights and activity carry an L2 penalty (losses the layers add, which the loss includes)."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(rows, random_state=0)
    scope = strategy.scope() if strategy is not None else _NoScope()
    penalty = dict(kernel_regularizer="l2", activity_regularizer=keras.regularizers.L2(1e-3)) if regularized else {}
    with scope:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((10,))]
                                 + [keras.layers.Dense(64, activation="relu", **penalty) for _ in range(4)]
                                 + [keras.layers.Dense(1)])
        _compiled(model, "mse")
    return Subject(model, x.astype(np.float32), y.astype(np.float32), batch, strategy=strategy,
                   fit_loss=None if strategy is not None else "mse")


class _NoScope:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_STRATEGIES: list = []


def mirrored() -> tf.distribute.Strategy:
    """One MirroredStrategy over two logical CPU devices for the process: a second one reuses
    the first one's collective instance keys, and plain model.fit then fails with "Shape
    mismatch in the collective instance" (TensorFlow 2.21, Keras 3.15, measured)."""
    if not _STRATEGIES:
        _STRATEGIES.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    return _STRATEGIES[0]


# --- keras-io examples ------------------------------------------------------------------------

class TokenAndPositionEmbedding(keras.layers.Layer):
    """keras-io "Text classification with Transformer": token and position embeddings."""

    def __init__(self, maxlen, vocab_size, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.token_emb = keras.layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = keras.layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        positions = keras.ops.arange(0, keras.ops.shape(x)[-1], 1)
        return self.token_emb(x) + self.pos_emb(positions)


class TransformerBlock(keras.layers.Layer):
    """keras-io "Text classification with Transformer": attention, feed-forward, LayerNorm."""

    def __init__(self, embed_dim, num_heads, ff_dim, **kwargs):
        super().__init__(**kwargs)
        self.att = keras.layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential([keras.layers.Dense(ff_dim, activation="relu"), keras.layers.Dense(embed_dim)])
        self.layernorm1 = keras.layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = keras.layers.LayerNormalization(epsilon=1e-6)

    def call(self, inputs):
        out1 = self.layernorm1(inputs + self.att(inputs, inputs))
        return self.layernorm2(out1 + self.ffn(out1))


def transformer_classifier(from_logits=False, **compile_kwargs) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(LENGTH,))
    x = TokenAndPositionEmbedding(LENGTH, VOCAB, 16)(inputs)
    x = TransformerBlock(16, 2, 16)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dense(20, activation="relu")(x)
    outputs = keras.layers.Dense(2, activation=None if from_logits else "softmax")(x)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    return _compiled(keras.Model(inputs=inputs, outputs=outputs), loss, **compile_kwargs), loss


def transformer(mode="plain") -> Subject:
    compile_kwargs = {"plain": {}, "jit_compile off": {"jit_compile": False}, "jit_compile on": {"jit_compile": True},
                      "run_eagerly": {"run_eagerly": True},
                      # every step inside an execution is checked: at learning rate 0, all at the start
                      "steps_per_execution 2, learning rate 0": {"steps_per_execution": 2,
                                                                 "optimizer": keras.optimizers.Adam(0.0)},
                      }.get(mode, {})
    model, loss = transformer_classifier(from_logits=mode == "from_logits", **compile_kwargs)
    ids, _ = tokens()
    subject = Subject(model, ids, labels(), BATCH, fit_loss=loss, frozen_weights="learning rate 0" in mode)
    if mode == "sample_weight":
        subject.sample_weight, subject.fit_loss = _rng(4).uniform(0, 2, ROWS).astype(np.float32), None
    elif mode == "class_weight":
        subject.class_weight, subject.fit_loss = {0: 0.3, 1: 2.5}, None
    elif mode == "tf.data":
        subject.dataset, subject.fit_loss = True, None
    return subject


def masked_lstm(one_hot=False) -> Subject:
    """Embedding(mask_zero=True) into an LSTM: padded steps are masked."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((LENGTH,)), keras.layers.Embedding(VOCAB, 8, mask_zero=True),
                              keras.layers.LSTM(8), keras.layers.Dense(3, activation="softmax")])
    y = labels(classes=3)
    loss = "categorical_crossentropy" if one_hot else "sparse_categorical_crossentropy"
    _compiled(model, loss)
    return Subject(model, tokens()[0], np.eye(3, dtype=np.float32)[y] if one_hot else y, BATCH, fit_loss=loss)


def masked_gru_tagger() -> Subject:
    """Embedding(mask_zero=True) into a GRU returning every step, a softmax per step: the
    loss averages the unmasked steps, and gradtools.fit's filled-up last batch adds its own
    mask to the model's."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((LENGTH,)), keras.layers.Embedding(VOCAB, 8, mask_zero=True),
                              keras.layers.GRU(8, return_sequences=True), keras.layers.Dense(4, activation="softmax")])
    _compiled(model, "sparse_categorical_crossentropy")
    ids = tokens()[0]
    return Subject(model, ids, _rng(11).integers(0, 4, ids.shape).astype(np.int32), BATCH,
                   fit_loss="sparse_categorical_crossentropy")


def lstm_seq2seq() -> Subject:
    """keras-io "Character-level recurrent sequence-to-sequence model": an encoder LSTM whose
    states start a decoder LSTM; two inputs, one-hot characters, categorical cross-entropy."""
    keras.utils.set_random_seed(0)
    chars, latent, steps = 12, 16, 6
    encoder_inputs = keras.Input(shape=(None, chars))
    _, state_h, state_c = keras.layers.LSTM(latent, return_state=True)(encoder_inputs)
    decoder_inputs = keras.Input(shape=(None, chars))
    decoder_outputs, _, _ = keras.layers.LSTM(latent, return_sequences=True, return_state=True)(
        decoder_inputs, initial_state=[state_h, state_c])
    outputs = keras.layers.Dense(chars, activation="softmax")(decoder_outputs)
    model = _compiled(keras.Model([encoder_inputs, decoder_inputs], outputs), "categorical_crossentropy",
                      keras.optimizers.RMSprop(1e-3))
    eye = np.eye(chars, dtype=np.float32)
    source, target = _rng(5).integers(0, chars, (ROWS, steps)), _rng(6).integers(0, chars, (ROWS, steps + 1))
    return Subject(model, [eye[source], eye[target[:, :-1]]], eye[target[:, 1:]], BATCH)


def wide_and_deep() -> Subject:
    """Two inputs (wide numeric features, a deep embedding of a category) and two outputs
    (a click probability and an auxiliary regression), loss weights 1 and 0.3."""
    keras.utils.set_random_seed(0)
    wide = keras.Input((6,), name="wide")
    category = keras.Input((1,), dtype="int32", name="category")
    deep = keras.layers.Flatten()(keras.layers.Embedding(20, 4)(category))
    deep = keras.layers.Dense(16, activation="relu")(deep)
    joined = keras.layers.Concatenate()([wide, deep])
    click = keras.layers.Dense(1, activation="sigmoid", name="click")(joined)
    value = keras.layers.Dense(1, name="value")(keras.layers.Dense(8, activation="relu")(joined))
    model = keras.Model({"wide": wide, "category": category}, {"click": click, "value": value})
    _compiled(model, {"click": "binary_crossentropy", "value": "mse"}, loss_weights={"click": 1.0, "value": 0.3})
    x = {"wide": _rng(7).normal(size=(ROWS, 6)).astype(np.float32),
         "category": _rng(8).integers(0, 20, (ROWS, 1)).astype(np.int32)}
    y = {"click": (x["wide"][:, 0] > 0).astype(np.float32)[:, None], "value": x["wide"][:, 1:2] * 3}
    return Subject(model, x, y, BATCH)


class Sampling(keras.layers.Layer):
    """keras-io VAE: z from (z_mean, z_log_var)."""

    def call(self, inputs):
        z_mean, z_log_var = inputs
        epsilon = keras.random.normal(keras.ops.shape(z_mean), seed=0)
        return z_mean + keras.ops.exp(0.5 * z_log_var) * epsilon


class VAE(keras.Model):
    """keras-io "Variational AutoEncoder": its own train_step computes the loss itself."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        inputs = keras.Input((16,))
        h = keras.layers.Dense(8, activation="relu")(inputs)
        z_mean, z_log_var = keras.layers.Dense(2)(h), keras.layers.Dense(2)(h)
        self.encoder = keras.Model(inputs, [z_mean, z_log_var, Sampling()([z_mean, z_log_var])])
        latent = keras.Input((2,))
        self.decoder = keras.Model(latent, keras.layers.Dense(16, activation="sigmoid")(
            keras.layers.Dense(8, activation="relu")(latent)))

    def call(self, x):
        return self.decoder(self.encoder(x)[2])

    def train_step(self, data):
        with tf.GradientTape() as tape:
            z_mean, z_log_var, z = self.encoder(data)
            reconstruction = self.decoder(z)
            reconstruction_loss = keras.ops.mean(keras.losses.binary_crossentropy(data, reconstruction))
            kl_loss = -0.5 * keras.ops.mean(1 + z_log_var - keras.ops.square(z_mean) - keras.ops.exp(z_log_var))
            total_loss = reconstruction_loss + kl_loss
        grads = tape.gradient(total_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        return {"loss": total_loss}


def vae() -> Subject:
    keras.utils.set_random_seed(0)
    model = VAE()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = _rng(9).uniform(0, 1, (ROWS, 16)).astype(np.float32)
    return Subject(model, x, None, BATCH)


class GAN(keras.Model):
    """keras-io "DCGAN"-style: a discriminator and a generator with optimizers of their own."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.discriminator = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu"),
                                               keras.layers.Dense(1)])
        self.generator = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8)])

    def call(self, x):
        return self.discriminator(x)

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer
        self.loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)

    def train_step(self, real):
        batch = tf.shape(real)[0]
        fake = self.generator(tf.random.normal((batch, 4), seed=0))
        data = tf.concat([fake, real], 0)
        truth = tf.concat([tf.ones((batch, 1)), tf.zeros((batch, 1))], 0)
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(truth, self.discriminator(data))
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))
        with tf.GradientTape() as tape:
            g_loss = self.loss_fn(tf.zeros((batch, 1)), self.discriminator(self.generator(
                tf.random.normal((batch, 4), seed=1))))
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))
        return {"d_loss": d_loss, "g_loss": g_loss}


def gan() -> Subject:
    keras.utils.set_random_seed(0)
    model = GAN()
    model.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3))
    return Subject(model, _rng(10).normal(size=(ROWS, 8)).astype(np.float32), None, BATCH)


# --- keras.applications ----------------------------------------------------------------------

def application(name: str, frozen: bool = False) -> Subject:
    """A keras.applications model at 32×32, 10 classes, no weights (``frozen``: the
    backbone of a transfer-learning head, frozen for a first fit, then unfrozen)."""
    keras.utils.set_random_seed(0)
    build = getattr(keras.applications, name)
    rows, batch = 20, 8
    x, y = images(rows), labels(rows, classes=10)
    if not frozen:
        model = _without_dropout(build(weights=None, input_shape=(32, 32, 3), classes=10))
        model = _compiled(model, "sparse_categorical_crossentropy")
        return Subject(model, x, y, batch, fit_loss="sparse_categorical_crossentropy", fit_jit_compile=False)
    backbone = _without_dropout(build(weights=None, input_shape=(32, 32, 3), include_top=False, pooling="avg"))
    backbone.trainable = False
    model = keras.Sequential([keras.Input((32, 32, 3)), backbone, keras.layers.Dense(10, activation="softmax")])
    _compiled(model, "sparse_categorical_crossentropy")

    def unfreeze(model):
        backbone.trainable = True
        _compiled(model, "sparse_categorical_crossentropy", keras.optimizers.Adam(1e-4))

    return Subject(model, x, y, batch, refit=unfreeze)


def _without_dropout(model):
    """EfficientNet's dropout and drop-connect at rate 0: a random mask would make two
    computations of one step differ."""
    for layer in model._flatten_layers():  # noqa: SLF001 (Keras has no public walk)
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    return model


# --- keras-hub -------------------------------------------------------------------------------

def _text_inputs(with_segments=True):
    ids, mask = tokens()
    x = {"token_ids": ids, "padding_mask": mask}
    if with_segments:
        x["segment_ids"] = np.zeros_like(ids)
    return x


def hub_classifier(family: str) -> Subject:
    """A keras-hub text classifier: BERT, DeBERTa-v3 or DistilBERT, 2 layers of width 16."""
    import keras_hub

    keras.utils.set_random_seed(0)
    models = keras_hub.models
    size = dict(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
                dropout=0.0, max_sequence_length=LENGTH)
    backbone, task = {"bert": (models.BertBackbone, models.BertTextClassifier),
                      "deberta_v3": (models.DebertaV3Backbone, models.DebertaV3TextClassifier),
                      "distil_bert": (models.DistilBertBackbone, models.DistilBertTextClassifier)}[family]
    if family == "deberta_v3":
        size["bucket_size"] = 4
    model = task(backbone=backbone(**size), num_classes=2, preprocessor=None, dropout=0.0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return Subject(model, _text_inputs(family == "bert"), labels(), BATCH)


def hub_causal_lm(family: str) -> Subject:
    """A keras-hub causal LM (GPT-2, Llama, Gemma), 2 layers of width 16: next-token targets,
    the padding mask as sample weights, as its preprocessor makes them."""
    import keras_hub

    keras.utils.set_random_seed(0)
    models = keras_hub.models
    if family == "gpt2":
        backbone = models.GPT2Backbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
                                       intermediate_dim=32, dropout=0.0, max_sequence_length=LENGTH)
        model = models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    elif family == "llama":
        backbone = models.LlamaBackbone(vocabulary_size=VOCAB, num_layers=2, num_query_heads=2, hidden_dim=16,
                                        intermediate_dim=32, num_key_value_heads=1)
        model = models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    else:
        backbone = models.GemmaBackbone(vocabulary_size=VOCAB, num_layers=2, num_query_heads=2,
                                        num_key_value_heads=1, hidden_dim=16, intermediate_dim=32, head_dim=8)
        model = models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    ids, mask = tokens()
    targets = np.concatenate([ids[:, 1:], np.zeros((ROWS, 1), np.int32)], axis=1)
    weights = np.concatenate([mask[:, 1:], np.zeros((ROWS, 1), bool)], axis=1).astype(np.float32)
    return Subject(model, {"token_ids": ids, "padding_mask": mask}, targets, BATCH, sample_weight=weights)


def hub_image_classifier(family: str) -> Subject:
    """A keras-hub image classifier: ViT (patch 8, 2 layers of width 16) or ResNet (two
    stages of basic blocks), on 32×32 images."""
    import keras_hub

    keras.utils.set_random_seed(0)
    models = keras_hub.models
    if family == "vit":
        backbone = models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
                                      hidden_dim=16, mlp_dim=32)
        model = models.ViTImageClassifier(backbone=backbone, num_classes=3, preprocessor=None)
    else:
        backbone = models.ResNetBackbone(input_conv_filters=[64], input_conv_kernel_sizes=[3],
                                         stackwise_num_filters=[64, 32], stackwise_num_blocks=[1, 1],
                                         stackwise_num_strides=[1, 2], block_type="basic_block",
                                         image_shape=(32, 32, 3))
        model = models.ResNetImageClassifier(backbone=backbone, num_classes=3, preprocessor=None)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))  # its loss: cross-entropy of the logits
    return Subject(model, images(), labels(classes=3), BATCH,
                   fit_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


# --- the zoo ---------------------------------------------------------------------------------

#: Why a case runs on Keras's TensorFlow backend only.
STRATEGY = "a tf.distribute strategy"
TAPE = "a train_step written with tf.GradientTape"
#: Plain model.fit fails on it too, under JAX on a CPU.
FLOAT16_EINSUM = "float16 attention: JAX's XLA on CPU has no float16 dot_general to float32"

CASES = [
    # the failures the zoo was made for: the fast core that `make test` runs
    Case("dense on a sequence", "partial last batch", dense_on_sequence, core=True),
    Case("transformer (keras-io)", "partial last batch", transformer, core=True, core_fit=False),
    Case("12 ReLU ×30, sigmoid", "probabilities (Keras uses the logits)", relu12_scale30, core=True),
    Case("12 ReLU ×30, softmax", "probabilities, one-hot labels",
         lambda: relu12_scale30("softmax", one_hot=True), core=True),
    Case("friedman regressor", "MirroredStrategy ×2, uneven last batch",
         lambda: friedman_regressor(mirrored()), needs="two devices", core=True, tensorflow_only=STRATEGY),
    Case("gpt2 (keras-hub)", "padding mask as sample weights", lambda: hub_causal_lm("gpt2"), core=True),
    # keras-hub
    Case("bert (keras-hub)", "padding_mask", lambda: hub_classifier("bert")),
    Case("deberta_v3 (keras-hub)", "padding_mask", lambda: hub_classifier("deberta_v3")),
    Case("distil_bert (keras-hub)", "padding_mask", lambda: hub_classifier("distil_bert")),
    Case("llama (keras-hub)", "padding mask as sample weights", lambda: hub_causal_lm("llama")),
    Case("gemma (keras-hub)", "padding mask as sample weights", lambda: hub_causal_lm("gemma")),
    Case("vit (keras-hub)", "partial last batch", lambda: hub_image_classifier("vit")),
    Case("resnet (keras-hub)", "partial last batch", lambda: hub_image_classifier("resnet")),
    Case("bert (keras-hub)", "mixed_float16", lambda: hub_classifier("bert"), FLOAT16_TOLERANCE,
         mixed_precision=True, tensorflow_only=FLOAT16_EINSUM),
    # keras.applications
    *[Case(f"{name} (keras.applications)", "partial last batch (gradtools.fit without XLA)",
           lambda name=name: application(name))
      for name in ("MobileNetV2", "EfficientNetB0", "DenseNet121", "ResNet50V2")],
    Case("MobileNetV2 (keras.applications)", "frozen backbone, then unfrozen",
         lambda: application("MobileNetV2", frozen=True)),
    # keras-io examples
    *[Case("transformer (keras-io)", mode, lambda mode=mode: transformer(mode))
      for mode in ("sample_weight", "class_weight", "tf.data", "steps_per_execution 2, learning rate 0",
                   "jit_compile on", "jit_compile off", "run_eagerly", "from_logits")],
    Case("transformer (keras-io)", "mixed_float16", transformer, FLOAT16_TOLERANCE, mixed_precision=True,
         tensorflow_only=FLOAT16_EINSUM),
    Case("transformer (keras-io)", "MirroredStrategy ×2", lambda: _under_strategy(transformer),
         needs="two devices", tensorflow_only=STRATEGY),
    Case("LSTM, mask_zero", "masking, integer labels", masked_lstm),
    Case("LSTM, mask_zero", "masking, one-hot labels", lambda: masked_lstm(one_hot=True)),
    Case("GRU tagger, mask_zero", "masking per time step, partial last batch", masked_gru_tagger),
    Case("LSTM seq2seq (keras-io)", "two inputs, partial last batch", lstm_seq2seq),
    Case("wide and deep", "two inputs, two outputs with loss weights", wide_and_deep),
    Case("VAE (keras-io)", "own train_step", vae, expect="refused", refusal="without self.compute_loss()",
         tensorflow_only=TAPE),
    Case("GAN (keras-io)", "own train_step and optimizers", gan, expect="refused",
         refusal="never updates its weights with model.optimizer", tensorflow_only=TAPE),
    Case("12 ReLU ×30, softmax", "from_logits=True, integer labels",
         lambda: relu12_scale30("softmax", from_logits=True)),
    Case("12 ReLU ×30, sigmoid", "from_logits=True", lambda: relu12_scale30("sigmoid", from_logits=True)),
    Case("friedman regressor", "one device, Adam", friedman_regressor),
    Case("friedman regressor", "weight and activity regularizers", lambda: friedman_regressor(regularized=True)),
    Case("friedman regressor", "mixed_float16, one device", friedman_regressor, FLOAT16_TOLERANCE,
         mixed_precision=True),
]


def _under_strategy(build):
    strategy = mirrored()
    with strategy.scope():
        subject = build()
    subject.strategy, subject.fit_loss = strategy, None
    return subject
