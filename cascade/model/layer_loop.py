"""The model's own decoder layers called one at a time (calling them is not re-implementing them), for layer skipping and Mixture-of-Depths.

What each layer receives besides its hidden states (attention mask, rotary embeddings, position ids, ...) is what the
model's own backbone computes before its layer loop. `LayerLoop` gets it from the backbone itself: a second, static
view of the backbone (its modules shared, not copied) holds recorders in place of the decoder layers, which note
their inputs and pass the hidden states through. Calling that view runs the embeddings, the mask and rotary
computations, and nothing of the layers; the layers are then called by `run`, any range of them, on any tokens. The
real model is never modified, so a compiled forward sees one static module.
"""

from __future__ import annotations

import copy
from typing import Callable

from torch import Tensor, nn

from cascade.model.hidden_history import first_output



class _Recorder(nn.Module):
    """Stands in for decoder layer i in the view: records what the backbone gives it, returns its hidden states. Any
    other attribute (an `attention_type` the backbone's loop reads) is the real layer's."""

    def __init__(self, layer: nn.Module, calls: list):
        super().__init__()
        self._layer, self._calls = [layer], calls  # lists: neither is registered as a child

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        self._calls.append((hidden_states, args, kwargs))
        return hidden_states

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._layer[0], name)


LayerCall = tuple[tuple, dict]  # the positional (after the hidden states) and keyword inputs of one decoder layer


class LayerLoop:
    """The decoder `layers` of a model's `backbone` called one at a time, with the inputs the backbone gives them."""

    def __init__(self, backbone: nn.Module, layers: nn.ModuleList):
        name = next((key for key, module in backbone.named_children() if module is layers), None)
        if name is None:
            raise ValueError(f"{type(backbone).__name__} does not hold its decoder layers as a direct child; it cannot run them one at a time")
        self.layers, self.calls, self.name = layers, [], name
        self.view = copy.copy(backbone)  # a new module object whose children are the backbone's own...
        self.view._modules = dict(backbone._modules)  # ...but in a dict of its own, so that this is its alone:
        self.view._modules[name] = nn.ModuleList(_Recorder(layer, self.calls) for layer in layers)
        self._backbone = [backbone]

    def layer_inputs(self, **backbone_inputs) -> tuple[Tensor, list[LayerCall]]:
        """The backbone's hidden states entering layer 1 (B, T, D) and every layer's other inputs, for `backbone_inputs`
        (what `LLM.forward` gives the backbone)."""
        backbone = self._backbone[0]
        self.view.training = backbone.training
        for key, module in backbone._modules.items():  # a module replaced since (a resized embedding) is used too
            if key != self.name:
                self.view._modules[key] = module
        self.calls.clear()
        self.view(**backbone_inputs)
        if len(self.calls) != len(self.layers):
            raise ValueError(f"{type(self.view).__name__} called {len(self.calls)} of its {len(self.layers)} layers")
        return self.calls[0][0], [(args, kwargs) for _, args, kwargs in self.calls]

    def run(self, h: Tensor, calls: list[LayerCall], start: int, stop: int, history: list | None = None,
            layer_fn: Callable | None = None) -> Tensor:
        """Layers `start` + 1 .. `stop` (1-indexed) on the residual stream `h` (B, T, D) after layer `start`. With
        `history` (L + 1 entries), the stream after each layer run goes to its entry. `layer_fn(number, layer, h, args,
        kwargs)`, where given, runs a layer instead of calling it (Mixture-of-Depths); it returns None to have the
        layer called as usual."""
        for number in range(start + 1, stop + 1):
            layer, (args, kwargs) = self.layers[number - 1], calls[number - 1]
            out = layer_fn(number, layer, h, args, kwargs) if layer_fn is not None else None
            h = first_output(layer(h, *args, **kwargs)) if out is None else out
            if history is not None:
                history[number] = h
        return h
