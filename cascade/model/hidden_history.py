"""The hidden history of a forward: the residual stream entering the first decoder layer and after
each layer.

`hidden_history` has L + 1 entries for L layers: [0] is the input to layer 1, [i] the output of
layer i. A forward is asked for some of them (`history`, indices modulo L + 1, so -1 is the last
layer; None asks for all); the others stay None.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

from torch import Tensor, nn


def first_output(output):
    """A decoder layer's hidden states: its output, or the first of the tuple some families return."""
    return output[0] if isinstance(output, (tuple, list)) else output


def asked(history: Sequence[int] | None, count: int) -> Sequence[int]:
    """The entries of a hidden history of `count` entries that `history` asks for, in order."""
    return range(count) if history is None else sorted({i % count for i in history})


def keep_asked(
    hidden_history: list[Tensor | None], history: Sequence[int] | None
) -> list[Tensor | None]:
    """`hidden_history` with the entries `history` does not ask for set to None."""
    if history is None:
        return hidden_history
    wanted = set(asked(history, len(hidden_history)))
    return [t if i in wanted else None for i, t in enumerate(hidden_history)]


@contextmanager
def capture(
    layers: Sequence[nn.Module], history: Sequence[int] | None
) -> Iterator[list[Tensor | None]]:
    """Fill a list of L + 1 hidden states by hooks on the decoder `layers` while the model runs."""
    count = len(layers) + 1
    captured: list[Tensor | None] = [None] * count
    handles = []
    for i in asked(history, count):
        if i == 0:

            def grab_input(module, args, kwargs):
                captured[0] = args[0] if args else kwargs["hidden_states"]

            handles.append(layers[0].register_forward_pre_hook(grab_input, with_kwargs=True))
        else:

            def grab_output(module, args, output, i=i):
                captured[i] = first_output(output)

            handles.append(layers[i - 1].register_forward_hook(grab_output))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
