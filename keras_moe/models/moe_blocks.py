"""Where a model's MoE blocks are, and helpers that read it.

Every keras_moe model class declares its MoE-capable stacks once, in
`MOE_STACKS`; upcycling, export and evaluation read it from there.
"""

from keras_moe.layers.moe import MoeLayer

_MOE_CONFIG_KEYS = ("encoder_moe_blocks", "decoder_moe_blocks")


def moe_layers(model):
    """The `MoeLayer`s of `model`, in layer order."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, MoeLayer)
    ]


def with_eval_capacity_factor(model, eval_capacity_factor):
    """A copy of `model` whose MoE blocks use `eval_capacity_factor`.

    The model is rebuilt from its config with the factor replaced in every
    MoE block's kwargs, weights copied by variable path; a model whose MoE
    layers already use it (or that has none) is returned as it is.

    Args:
        model: a keras_moe `ViT` or `T5`.
        eval_capacity_factor: None (no token dropped) or a float > 0.
    """
    layers = moe_layers(model)
    if all(
        layer.eval_capacity_factor == eval_capacity_factor for layer in layers
    ):
        return model
    config = dict(model.get_config())
    for key in _MOE_CONFIG_KEYS:
        if config.get(key):
            config[key] = {
                index: {**kwargs, "eval_capacity_factor": eval_capacity_factor}
                for index, kwargs in config[key].items()
            }
    rebuilt = type(model).from_config(config)
    targets = {weight.path: weight for weight in rebuilt.weights}
    sources = {weight.path: weight for weight in model.weights}
    if targets.keys() != sources.keys():
        raise ValueError(
            "the rebuilt model's weights differ from the original's: "
            f"{sorted(targets.keys() ^ sources.keys())[:6]}"
        )
    for path, target in targets.items():
        target.assign(sources[path].value)
    return rebuilt
