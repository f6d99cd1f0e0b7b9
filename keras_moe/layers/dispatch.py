"""Dispatchers: move tokens into expert slots and expert outputs back.

Shape letters: G groups, S tokens per group, E experts, C expert capacity,
D model dimension.

Both dispatchers implement the same two maps of a `RoutingInstructions`:

    dispatch: <[G, S, D]> tokens  -> <[G, E, C, D]> slots (empty slots are 0)
    combine:  <[G, E, C, D]> slots -> <[G, S, D]> tokens, weighted sum

* `EinsumDispatcher` builds the one-hot <[G, S, E, C]> arrays and contracts
  them: O(G * S * E * C * D) work, all matmuls, the usual choice on TPU.
* `IndicesDispatcher` gathers token rows into slots and adds slot rows back
  with a segment sum: O(G * E * C * D) work, independent of the one-hot size,
  the faster choice on CPU and GPU (see `benchmarks/moe_layer.py` and
  docs/BENCHMARKS.md).

Their outputs and gradients agree to float tolerance (tests/layers).
"""

from keras import ops


class Dispatcher:
    """Interface: `dispatch(inputs)` and `combine(expert_outputs)`."""

    def __init__(self, instructions):
        self.instructions = instructions

    def dispatch(self, inputs):
        raise NotImplementedError

    def combine(self, expert_outputs):
        raise NotImplementedError


class EinsumDispatcher(Dispatcher):
    """Dispatch and combine as einsums with the dense one-hot arrays."""

    def dispatch(self, inputs):
        mask = ops.cast(self.instructions.dispatch_array(), inputs.dtype)
        return ops.einsum("gsec,gsd->gecd", mask, inputs)

    def combine(self, expert_outputs):
        weights = ops.cast(
            self.instructions.combine_array(), expert_outputs.dtype
        )
        return ops.einsum("gsec,gecd->gsd", weights, expert_outputs)


class IndicesDispatcher(Dispatcher):
    """Dispatch as a gather, combine as a segment sum over token rows."""

    def dispatch(self, inputs):
        info = self.instructions
        num_groups = ops.shape(inputs)[0]
        # Global row of each slot's token: (G, E, C), rows of (G*S, D).
        rows = _global_rows(info.token_index, info.num_tokens, num_groups)
        flat = ops.reshape(inputs, (-1, inputs.shape[-1]))
        slots = ops.take(flat, rows, axis=0)  # (G, E, C, D)
        return slots * ops.cast(info.dispatch_mask, inputs.dtype)[..., None]

    def combine(self, expert_outputs):
        info = self.instructions
        num_groups = ops.shape(expert_outputs)[0]
        model_dim = expert_outputs.shape[-1]
        num_rows = num_groups * info.num_tokens
        rows = _global_rows(info.token_index, info.num_tokens, num_groups)
        # Empty slots go to a spare row that is cut off below.
        rows = ops.where(info.dispatch_mask > 0, rows, num_rows)
        weighted = (
            expert_outputs
            * ops.cast(info.combine_weights, expert_outputs.dtype)[..., None]
        )
        summed = ops.segment_sum(
            ops.reshape(weighted, (-1, model_dim)),
            ops.reshape(rows, (-1,)),
            num_segments=num_rows + 1,
        )
        # (G*S, D) -> (G, S, D)
        return ops.reshape(
            summed[:num_rows], (num_groups, info.num_tokens, model_dim)
        )


DISPATCHERS = {"einsum": EinsumDispatcher, "indices": IndicesDispatcher}


def get_dispatcher(name):
    """Returns the dispatcher class called `name` ("einsum" or "indices")."""
    if name not in DISPATCHERS:
        raise ValueError(
            f"dispatcher must be one of {tuple(DISPATCHERS)} or 'auto'; "
            f"received {name!r}"
        )
    return DISPATCHERS[name]


def _global_rows(token_index, num_tokens, num_groups):
    group = ops.arange(num_groups, dtype="int32")[:, None, None]
    return group * num_tokens + token_index
