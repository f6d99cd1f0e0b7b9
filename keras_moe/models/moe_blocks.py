"""Where a model's MoE blocks are, and helpers that read it.

Every keras_moe model class declares its MoE-capable stacks once, in its
class attribute `MOE_STACKS`: a tuple of `MoeStack`s, each naming the
config key that holds the stack's MoE blocks, where its block count and
its blocks are, and what kind of stack it is. Upcycling
(`keras_moe.upcycle`), the export adapters and the helpers below read it
from there; nothing else names those keys.

Example:

>>> from keras_moe.models import T5
>>> [stack.moe_key for stack in T5.MOE_STACKS]
['encoder_moe_blocks', 'decoder_moe_blocks']
"""

import dataclasses
import functools

from keras_moe.layers.moe import MoeLayer

VISION = "vision"
LANGUAGE = "language"
MODALITIES = (VISION, LANGUAGE)


@dataclasses.dataclass(frozen=True)
class MoeStack:
    """One transformer stack of a model whose MLP blocks can be MoE blocks.

    Attributes:
        name: the stack's name: the prefix of its canonical variable names
            (`encoder/block_0/mlp/wi`), a key of `keras_moe.upcycle`'s
            `blocks` dict, the `stack` argument of `moe_layers`.
        moe_key: the model's constructor (and config) argument that holds
            the stack's MoE blocks: None or {block index: MoeLayer kwargs}.
        layers_key: the config key holding the stack's number of blocks.
        blocks: dotted attribute path from the model to the stack's list
            of blocks ("encoder.blocks"); each block's MLP is its `mlp`.
        modality: VISION or LANGUAGE; upcycling picks its defaults by it
            (combine weights normalised in vision stacks only).
        causal: the stack is a decoder: a token's output must not depend
            on later tokens, which expert-choice routing would break.
        layers_config: the config key of the sub-config holding
            `layers_key` (a model holding another model's kwargs); None:
            the model's config itself.

    Example:

    >>> stack = MoeStack("encoder", "encoder_moe_blocks", "num_layers",
    ...                  blocks="blocks", modality=VISION)
    >>> stack.num_layers({"num_layers": 4})
    4
    >>> stack.within("vision_encoder", "vision_config").blocks
    'vision_encoder.blocks'
    """

    name: str
    moe_key: str
    layers_key: str
    blocks: str
    modality: str
    causal: bool = False
    layers_config: str | None = None

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(
                f"modality must be one of {MODALITIES}; received "
                f"{self.modality!r}"
            )

    def num_layers(self, config):
        """The number of blocks of this stack in a model's `config`."""
        if self.layers_config is not None:
            config = config[self.layers_config]
        return config[self.layers_key]

    def block_layers(self, model):
        """The stack's blocks (layers) in `model`, in order."""
        return functools.reduce(getattr, self.blocks.split("."), model)

    def within(self, attribute, layers_config, **changes):
        """This stack of a sub-model, as the model holding it declares it.

        Args:
            attribute: the holding model's attribute that is the sub-model.
            layers_config: the holding model's config key of the
                sub-model's kwargs.
            **changes: other fields to replace (`name`, `moe_key`).

        Returns:
            A new `MoeStack`.
        """
        return dataclasses.replace(
            self,
            blocks=f"{attribute}.{self.blocks}",
            layers_config=layers_config,
            **changes,
        )


def moe_stacks(model):
    """The `MoeStack`s `model`'s class declares, or raises a ValueError.

    Example:

    >>> from keras_moe.models import ViT
    >>> [stack.name for stack in moe_stacks(ViT.from_architecture("vit_tiny"))]
    ['encoder']
    """
    stacks = getattr(type(model), "MOE_STACKS", None)
    if not stacks:
        raise ValueError(
            f"{type(model).__name__} declares no MoE-capable stacks "
            "(MOE_STACKS); keras_moe's ViT, T5 and VisionLanguageModel do"
        )
    return stacks


def sublayers(layer):
    """Every layer nested in `layer` (itself excluded), each once.

    Keras 3 has no public way to list nested layers: `Model.layers` lists
    direct children only. `_flatten_layers` is the recursive walk Keras
    itself uses to collect weights and losses; this is the one place that
    calls it, so a Keras change to it is fixed here.

    Example:

    >>> import keras
    >>> inner = keras.Sequential([keras.layers.Dense(2, name="d")], name="in")
    >>> [layer.name for layer in sublayers(keras.Sequential([inner]))]
    ['in', 'd']
    """
    return list(layer._flatten_layers(include_self=False))


def moe_layers(model, stack=None):
    """The `MoeLayer`s of `model` (or of one of its stacks), in layer order.

    Args:
        model: any Keras layer or model.
        stack: None for every `MoeLayer` nested in `model`; or the name of
            a stack its class declares in `MOE_STACKS` ("encoder",
            "decoder", "vision"): those of that stack's blocks only.

    Returns:
        A list of `MoeLayer`s.

    Example:

    >>> import keras_moe
    >>> from keras_moe.models import T5
    >>> moe = keras_moe.upcycle(T5.from_architecture("t5_tiny"), num_experts=4)
    >>> len(moe_layers(moe)), len(moe_layers(moe, "decoder"))
    (2, 1)
    """
    if stack is None:
        layers = sublayers(model)
    else:
        stacks = {s.name: s for s in moe_stacks(model)}
        if stack not in stacks:
            raise ValueError(
                f"{type(model).__name__} has no stack {stack!r}; its "
                f"stacks: {sorted(stacks)}"
            )
        layers = [
            layer
            for block in stacks[stack].block_layers(model)
            for layer in sublayers(block)
        ]
    return [layer for layer in layers if isinstance(layer, MoeLayer)]


def with_eval_capacity_factor(model, eval_capacity_factor):
    """A copy of `model` whose MoE blocks use `eval_capacity_factor`.

    The model is rebuilt from its config with the factor written into the
    kwargs of every MoE block (the config keys of its `MOE_STACKS`), and
    its weights are copied by variable path. A model without `MoeLayer`s,
    or whose `MoeLayer`s already use the factor, is returned as it is;
    the input model is never changed.

    Args:
        model: a keras_moe `ViT`, `T5` or `VisionLanguageModel` (a class
            declaring `MOE_STACKS`).
        eval_capacity_factor: None (no token dropped) or a float > 0.

    Returns:
        `model`, or a new model of its class.

    Raises:
        ValueError: for an invalid factor (from `MoeLayer`), or when a
            `MoeLayer` of the rebuilt model does not use the factor (it is
            not created from a declared stack's config key).

    Example:

    >>> import keras_moe
    >>> from keras_moe.models import ViT
    >>> moe = keras_moe.upcycle(
    ...     ViT.from_architecture("vit_tiny"), num_experts=4)
    >>> no_drop = with_eval_capacity_factor(moe, None)
    >>> [layer.eval_capacity_factor for layer in moe_layers(no_drop)]
    [None]
    """
    if all(
        layer.eval_capacity_factor == eval_capacity_factor
        for layer in moe_layers(model)
    ):
        return model
    keys = [stack.moe_key for stack in moe_stacks(model)]
    # New dicts for the MoE block configs: the model's own stay unchanged.
    config = dict(model.get_config())
    for key in keys:
        if config.get(key):
            config[key] = {
                index: {**kwargs, "eval_capacity_factor": eval_capacity_factor}
                for index, kwargs in config[key].items()
            }
    rebuilt = type(model).from_config(config)
    wrong = [
        layer.path
        for layer in moe_layers(rebuilt)
        if layer.eval_capacity_factor != eval_capacity_factor
    ]
    if wrong:
        raise ValueError(
            f"MoeLayers {wrong} of {type(model).__name__} are not created "
            f"from the config keys {keys} of its MOE_STACKS; cannot set "
            "their eval_capacity_factor"
        )
    sources = {weight.path: weight for weight in model.weights}
    targets = {weight.path: weight for weight in rebuilt.weights}
    if sources.keys() != targets.keys():
        raise ValueError(
            "The rebuilt model's weights differ from the original's: "
            f"missing {sorted(sources.keys() - targets.keys())}, extra "
            f"{sorted(targets.keys() - sources.keys())}"
        )
    for path, target in targets.items():
        target.assign(sources[path].value)
    return rebuilt
