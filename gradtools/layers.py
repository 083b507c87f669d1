"""Which variables are a model's numbered layers, what they are called, and the blocks that
say how deep each one sits.

A numbered layer is a trainable weight matrix (:data:`KERNEL_NAMES`): a ``kernel`` (Dense, Conv,
the projections inside ``MultiHeadAttention``, RNN cells), the ``depthwise_kernel`` and
``pointwise_kernel`` of a separable convolution, the ``lora_kernel_a`` and ``lora_kernel_b``
of a layer fine-tuned with LoRA. They are numbered ``layer_1, layer_2, …`` in
``trainable_weights`` order and named by their path (``encoder/attention/query/kernel``). A
recurrent layer's ``recurrent_kernel`` is recorded beside its kernel.

A *block* is the top-level layer a kernel belongs to (nested Functional or Sequential models
are opened): the query, key and value projections of one attention layer, or the forward and
backward halves of a ``Bidirectional`` LSTM, sit at the same depth, so the diagnosis compares
depths block by block, not kernel by kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradtools.columns import layer_name


@dataclass(frozen=True)
class LayerLayout:
    """Where the numbered layers are in a list of trainable variables."""

    #: Position of layer_k's kernel (index k − 1) in the variable list.
    kernel_positions: tuple[int, ...]
    #: Layer number k -> position of the ``recurrent_kernel`` beside its kernel.
    recurrent_positions: dict[int, int]
    #: layer_k's kernel path (index k − 1).
    paths: tuple[str, ...]

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.recurrent_positions))

    @property
    def monitored(self) -> list[int]:
        """Positions whose statistics make a row, in column order: each kernel, then its
        layer's recurrent kernel if it has one (see :func:`gradtools.columns.layer_columns`)."""
        ordered = []
        for k, position in enumerate(self.kernel_positions, start=1):
            ordered.append(position)
            if k in self.recurrent_positions:
                ordered.append(self.recurrent_positions[k])
        return ordered


#: The names of the variables that are numbered layers.
KERNEL_NAMES = frozenset({"kernel", "depthwise_kernel", "pointwise_kernel", "lora_kernel_a", "lora_kernel_b"})


def is_kernel(variable) -> bool:
    """Whether ``variable`` is a numbered layer's weight matrix (:data:`KERNEL_NAMES`)."""
    return variable.name in KERNEL_NAMES


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0]


def layer_layout(variables) -> LayerLayout:
    """The numbered layers among ``variables`` (a model's trainable weights, in order)."""
    variables = list(variables)
    kernels = [i for i, v in enumerate(variables) if is_kernel(v)]
    if not kernels:
        raise ValueError(f"the model has no trainable weight matrix ({', '.join(sorted(KERNEL_NAMES))}: "
                         "Dense, Conv, RNN and attention layers have one); gradtools numbers layers by them")
    by_parent = {_parent(v.path): i for i, v in enumerate(variables) if v.name == "recurrent_kernel"}
    recurrent = {k: by_parent[_parent(variables[i].path)]
                 for k, i in enumerate(kernels, start=1) if _parent(variables[i].path) in by_parent}
    return LayerLayout(tuple(kernels), recurrent, tuple(variables[i].path for i in kernels))


def layer_blocks(model, paths) -> list[str]:
    """The block of each kernel path: the name of the top-level layer that owns it (nested
    Functional and Sequential models are opened). A path no top-level layer owns is its own block."""
    import keras  # here, so that reading run directories never starts TensorFlow

    owner: dict[str, str] = {}

    def visit(container: keras.Model) -> None:
        for layer in container.layers:
            if isinstance(layer, keras.Model) and layer.layers:
                visit(layer)
            else:
                for variable in layer.trainable_weights:
                    owner.setdefault(variable.path, layer.name)

    visit(model)
    return [owner.get(path, path) for path in paths]


def block_downstream(model, blocks) -> dict[str, list[str]]:
    """For each of ``blocks`` (see :func:`layer_blocks`), the blocks its output reaches,
    directly or further on: what "the blocks after it" means to the diagnosis's depth rule. A
    functional model is followed along its connections (nested models opened), so heads and
    branches side by side are not after one another; a Sequential or subclassed model, whose
    connections Keras does not record, in layer order (as is every model, should the private
    record of the graph this reads change in a later Keras). A block no layer owns: every block
    listed after it."""
    import keras

    try:
        _, after = _blocks_after(model, keras)
    except (AttributeError, TypeError, KeyError):  # Keras's private record of the graph changed
        after = {}
    order = list(dict.fromkeys(blocks))
    return {block: [other for other in order if other in after[block]] if block in after
            else order[order.index(block) + 1:] for block in order}


def _blocks_after(container, keras) -> tuple[list[str], dict[str, set[str]]]:
    """The blocks inside ``container`` in layer order, and for each the blocks after it there."""
    if not (isinstance(container, keras.Model) and container.layers):
        names = [container.name] if container.trainable_weights else []
        return names, {name: set() for name in names}
    parts = [(layer, *_blocks_after(layer, keras)) for layer in container.layers]
    blocks_of = {id(layer): inner for layer, inner, _ in parts}
    reached = _reached_from_outputs(container)
    blocks: list[str] = []
    after: dict[str, set[str]] = {}
    for i, (layer, inner, inner_after) in enumerate(parts):
        fed = _outputs_fed(layer, keras)
        for block in inner:
            if reached is None:
                later = {id(other) for other, _, _ in parts[i + 1:]}
            else:  # from the outputs of ``layer`` that ``block`` feeds (a nested model's heads)
                outputs = reached.get(id(layer), {})
                feeds = None if fed is None else fed.get(block)
                later = set().union(*(found for t, found in outputs.items() if feeds is None or t in feeds))
            outside = {other_block for other in later for other_block in blocks_of.get(other, ())}
            after.setdefault(block, inner_after[block] | outside)
        blocks += inner
    return blocks, after


def _outputs_fed(layer, keras) -> dict[str, set[int]] | None:
    """For a nested functional model with several outputs, each block inside it -> the indices of
    the outputs it feeds; None for another layer (each of its blocks feeds all its outputs)."""
    from keras.src.models.functional import Functional

    if not isinstance(layer, Functional) or len(layer.outputs) < 2:
        return None
    reached = _reached_from_outputs(layer)
    fed: dict[str, set[int]] = {}
    for inner in layer.layers:
        reach = {id(inner)}.union(*reached.get(id(inner), {}).values())
        outputs = {t for t, output in enumerate(layer.outputs) if id(output._keras_history.operation) in reach}
        for block in _blocks_after(inner, keras)[0]:
            fed.setdefault(block, outputs)
    return fed


def _reached_from_outputs(model) -> dict[int, dict[int, set[int]]] | None:
    """For a functional model: a layer's id -> the index of one of its outputs -> the ids of the
    layers that output reaches, directly or further on (Keras's record of the graph:
    ``Function._nodes_by_depth``); None for other models."""
    from keras.src.models.functional import Functional

    if not isinstance(model, Functional):
        return None
    fed: dict[tuple[int, int], set[int]] = {}
    children: dict[int, set[int]] = {}
    for node in (node for nodes in model._nodes_by_depth.values() for node in nodes):
        for tensor in node.arguments.keras_tensors:
            source = tensor._keras_history
            if source.operation is not None:
                fed.setdefault((id(source.operation), source.tensor_index), set()).add(id(node.operation))
                children.setdefault(id(source.operation), set()).add(id(node.operation))

    def reach(operation: int, first: set[int]) -> set[int]:  # a walk: graphs can be 1000 deep
        found, waiting = set(), list(first)
        while waiting:
            child = waiting.pop()
            if child not in found:
                found.add(child)
                waiting += children.get(child, ())
        return found - {operation}  # a layer called on its own output is not after itself

    reached: dict[int, dict[int, set[int]]] = {}
    for (operation, t), first in fed.items():
        reached.setdefault(operation, {})[t] = reach(operation, first)
    return reached


def layer_label(k: int, paths) -> str:
    """``layer_3 (encoder/attention/value/kernel)``, or ``layer_3`` when the path is unknown."""
    return f"{layer_name(k)} ({paths[k - 1]})" if paths and k <= len(paths) else layer_name(k)
