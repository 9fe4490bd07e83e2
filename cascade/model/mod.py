"""Mixture-of-Depths (Raposo et al. 2024) on the model's own decoder layers.

A router (one `nn.Linear(hidden, 1)` per routed layer) scores every token. In training each
sequence (a row, or a segment of a packed row) keeps its top `ceil(capacity * length)` tokens;
only those, in their original order, are gathered and run through the real HF layer, under the
original attention mask restricted to them, so they attend only to kept tokens of their own
sequence. The others skip the layer through the residual.

Top-k is not causal: whether a token is kept depends on later tokens' scores. So the router is
also trained, by an auxiliary BCE (`aux_loss`), to predict its own top-k membership, and in
eval mode a token is processed iff sigmoid(logit) > 0.5. That decision reads only the token's
own residual state, which depends only on earlier tokens: at sampling time each new token is
routed as it arrives, and a token that skips a layer would simply write no KV entry there
(this repository keeps no KV cache; eval runs whole sequences under the same causal rule).

The paper scales a kept token's layer update by its router weight, so no capacity reproduces
the plain model. Here the update is scaled by a straight-through gate whose value is exactly 1
and whose gradient is that of log sigmoid(logit) (as s / s.detach(), without its 0 / 0 when s
underflows): capacity 1.0 is the plain model, and the router still learns from the LM loss.
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cascade.model.attention import ATTENTION
from cascade.data.packing import gather_index
from cascade.model.hidden_history import first_output

MOD_ROUTERS = "mod_routers.safetensors"  # beside the HF weights of a Mixture-of-Depths model
_PER_TOKEN = ("attention_mask", "position_ids", "position_embeddings")  # layer inputs with a T axis that we gather



def kept_count(length: int, capacity: float) -> int:
    """ceil(capacity * length); the epsilon keeps 0.3 * 10 at 3, not 4."""
    return math.ceil(length * capacity - 1e-9)


def top_k_per_sequence(scores: Tensor, segment_ids: Tensor, capacity: float) -> Tensor:
    """(B, T) scores -> (B, T) bool: each segment keeps its `kept_count(length)` best tokens; padding (-1) none.

    Tokens are sorted by score, then (stably) by segment, so each segment's tokens lie together
    best first and a token's rank is its offset from its segment's start.
    """
    T = scores.shape[1]
    order = scores.sort(dim=1, descending=True, stable=True).indices
    order = order.gather(1, segment_ids.gather(1, order).sort(dim=1, stable=True).indices)
    segment = segment_ids.gather(1, order)
    positions = torch.arange(T, device=scores.device).expand_as(segment)
    starts = torch.ones_like(segment, dtype=torch.bool)
    starts[:, 1:] = segment[:, 1:] != segment[:, :-1]
    start = torch.where(starts, positions, 0).cummax(1).values
    group = starts.long().cumsum(1) - 1
    length = torch.zeros_like(group).scatter_add_(1, group, torch.ones_like(group)).gather(1, group)
    keep = (positions - start < (length.double() * capacity - 1e-9).ceil()) & (segment != -1)
    return torch.zeros_like(keep).scatter_(1, order, keep)


def gather_mask(mask: Tensor | None, index: Tensor, valid: Tensor | None) -> Tensor | None:
    """The layer's 4D attention mask restricted to the gathered tokens: real tokens see no padding slot, and a
    padding slot sees at least itself (no empty softmax row); its output is thrown away."""
    if mask is None:
        return None  # plain causal: kept tokens are in order and padding slots come last, so no real token sees one
    if mask.dim() != 4:
        raise ValueError(f"Mixture-of-Depths needs a 4D attention mask (sdpa or eager attention), got shape {tuple(mask.shape)}")
    B, K = index.shape
    mask = mask.expand(B, -1, -1, -1)
    heads, T = mask.shape[1], mask.shape[-1]
    rows = mask.gather(2, index[:, None, :, None].expand(B, heads, K, T))
    mask = rows.gather(3, index[:, None, None, :].expand(B, heads, K, K))
    if valid is None:
        return mask
    visible = valid[:, None, None, :] | torch.eye(K, dtype=torch.bool, device=index.device)  # (B, 1, K, K)
    return mask & visible if mask.dtype == torch.bool else mask.masked_fill(~visible, torch.finfo(mask.dtype).min)


def _gather_tokens(value: Tensor, index: Tensor) -> Tensor:
    """(1 or B, T, ...) -> (B, K, ...) at `index` (B, K)."""
    value = value.expand(index.shape[0], *value.shape[1:])
    return value.gather(1, index.view(*index.shape, *[1] * (value.dim() - 2)).expand(*index.shape, *value.shape[2:]))


class MixtureOfDepths(nn.Module):
    """Routers for the routed layers among a model's decoder layers, applied by its layer loop (`LLM.enable_mod`, or
    `LLM.routed_by`).

    `decoder_layers`: the model's decoder layers, of width `dim`. `capacity` in (0, 1]: the fraction of each
    sequence's tokens a routed layer processes in training. `layers` (1-indexed): the routed layers; default every other
    layer, 2, 4, ... After each forward: `selected[l]` (B, T) bool, `layer_tokens[l]` (tokens the layer ran on,
    padding slots included) and `aux_loss()`.
    """

    def __init__(self, decoder_layers: Sequence[nn.Module], dim: int, capacity: float, layers: list[int] | None = None):
        super().__init__()
        if not 0 < capacity <= 1:
            raise ValueError(f"capacity must be in (0, 1], got {capacity}")
        L = len(decoder_layers)
        layers = list(range(2, L + 1, 2)) if layers is None else list(layers)
        bad = [layer for layer in layers if not (isinstance(layer, int) and 1 <= layer <= L)]
        if bad or not layers or len(set(layers)) != len(layers):
            raise ValueError(f"Mixture-of-Depths layers must be distinct layers of 1..{L} (1-indexed), at least one; got {layers}")
        self.capacity, self.layers, self.num_layers = capacity, sorted(layers), L
        weight = next(decoder_layers[0].parameters())  # the routers' device and dtype
        self._input_names = {l: _positional_names(decoder_layers[l - 1]) for l in self.layers}
        self.routers = nn.ModuleDict({str(l): nn.Linear(dim, 1, device=weight.device, dtype=weight.dtype) for l in self.layers})
        self._reset(None)

    def _reset(self, segment_ids: Tensor | None) -> None:
        self.segment_ids = segment_ids
        self.selected: dict[int, Tensor] = {}
        self.layer_tokens: dict[int, int] = {}
        self._bce: dict[int, Tensor] = {}
        self._real: Tensor | None = None  # (B, T) bool, None: every token is real

    def select(self, layer: int, x: Tensor, logits: Tensor) -> Tensor:
        """The tokens layer `layer` processes: per-sequence top-k in training, sigmoid(logit) > 0.5 in eval.
        Also records the BCE of the router (on `x` detached) against the top-k membership, over real tokens."""
        scores, real = logits.detach(), None if self.segment_ids is None else self.segment_ids != -1
        if real is None:
            chosen = scores.topk(kept_count(scores.shape[1], self.capacity), dim=1).indices
            top_k = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)
        else:
            assert self.segment_ids.shape == scores.shape, f"segment_ids {tuple(self.segment_ids.shape)} do not match the tokens {tuple(scores.shape)}"
            top_k = top_k_per_sequence(scores, self.segment_ids, self.capacity)
        aux_logits = self.routers[str(layer)](x.detach()).squeeze(-1).float()
        weight = None if real is None else real.float() * (real.numel() / real.sum().clamp(min=1))  # mean over real tokens
        self._bce[layer] = F.binary_cross_entropy_with_logits(aux_logits, top_k.float(), weight)
        selected = top_k if self.training else logits > 0 if real is None else (logits > 0) & real
        self.selected[layer], self._real = selected, real
        return selected

    def aux_loss(self) -> Tensor:
        """Σ over routed layers of the router's BCE against its own top-k membership, on the last forward."""
        if not self._bce:
            raise RuntimeError("aux_loss() needs a forward routed by these routers first")
        return sum(self._bce.values())

    def layers_run(self) -> Tensor:
        """(B, T) float32: how many decoder layers each position of the last forward ran through."""
        return sum(s.float() for s in self.selected.values()) + (self.num_layers - len(self.layers))

    def compute_fraction(self) -> float:
        """Decoder-layer token work of the last forward relative to every layer on every real token."""
        layers = self.layers_run()
        return float((layers if self._real is None else layers[self._real]).mean()) / self.num_layers

    def begin(self, implementation: str, num_layers: int, segment_ids: Tensor | None = None) -> None:
        """Start a forward (`LLM.forward` calls this) of a model of attention `implementation` and `num_layers` decoder
        layers, whose rows have `segment_ids` (padding -1)."""
        if implementation not in ("sdpa", "eager", ATTENTION):
            raise ValueError(f"Mixture-of-Depths needs attn_implementation 'sdpa' or 'eager', got {implementation!r}")
        if num_layers != self.num_layers:
            raise ValueError(f"these routers were built for {self.num_layers} layers, but the LLM has {num_layers}")
        self._reset(segment_ids)

    def run_layer(self, number: int, layer: nn.Module, x: Tensor, args: tuple, kwargs: dict) -> Tensor | None:
        """Decoder layer `number` (1-indexed) on the residual stream `x` (B, T, D), called by the LLM's layer loop with
        the layer's other inputs: a routed layer runs on the kept tokens only (their inputs gathered) and returns the
        new stream; for a layer not routed, None (the loop calls it as usual)."""
        if str(number) not in self.routers:
            return None
        names = self._input_names[number]  # found once, not per call: a compiled forward traces no signature
        if len(args) >= len(names):
            raise ValueError(f"Mixture-of-Depths cannot route {type(layer).__name__}: it takes {len(args) + 1} positional inputs")
        inputs = {**dict(zip(names[1:], args)), **kwargs}
        logits = self.routers[str(number)](x).squeeze(-1).float()  # (B, T)
        selected = self.select(number, x, logits)
        static_count = kept_count(x.shape[1], self.capacity) if self.training and self.segment_ids is None else None
        index, valid = gather_index(selected, static_count)  # (B, K)
        self.layer_tokens[number] = index.numel()
        if index.shape[1] == 0:
            return x
        gathered = {name: _gather_input(layer, name, value, index, valid) for name, value in inputs.items()}
        x_kept = _gather_tokens(x, index)  # (B, K, D)
        y = first_output(layer(x_kept, **gathered))
        # gate * y + (1 - gate) * x is y bit for bit when gate == 1; x + gate * (y - x) would round.
        log_gate = F.logsigmoid(logits.gather(1, index))[..., None]
        gate = torch.exp(log_gate - log_gate.detach())
        mixed = (gate * y + (1 - gate) * x_kept).to(x.dtype)
        if valid is not None:
            mixed = torch.where(valid[..., None], mixed, x_kept)
        return x.scatter(1, index[..., None].expand_as(mixed), mixed)


def _positional_names(layer: nn.Module) -> list[str]:
    """The names of the layer's positional parameters, in order (GPT-2's block takes its attention mask positionally)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [name for name, p in inspect.signature(layer.forward).parameters.items() if p.kind in kinds]


def _gather_input(layer: nn.Module, name: str, value, index: Tensor, valid: Tensor | None):
    """A layer input restricted to the kept tokens `index` (B, K): per-token tensors gathered, the mask restricted."""
    if name == "attention_mask":
        return gather_mask(value, index, valid)
    if not any(isinstance(v, Tensor) for v in (value if isinstance(value, (tuple, list)) else (value,))):
        return value  # None, flags, an empty cache
    if name not in _PER_TOKEN:
        raise ValueError(
            f"Mixture-of-Depths cannot route {type(layer).__name__}: it receives {name!r}, a tensor input it "
            f"does not know how to gather per token (known: {_PER_TOKEN}); route another architecture or extend mod.py"
        )
    if isinstance(value, Tensor):
        return _gather_tokens(value, index)
    return tuple(_gather_tokens(v, index) for v in value)  # rotary (cos, sin)


def save_routers(mod: MixtureOfDepths, path: str | os.PathLike) -> None:
    """Write the routers of `mod` into `path`, beside the model's HF weights."""
    save_file(mod.state_dict(), os.path.join(path, MOD_ROUTERS))


def load_routers(path: str | os.PathLike) -> dict[str, Tensor]:
    """The routers' state that `save_routers` wrote into `path`, for `MixtureOfDepths.load_state_dict`."""
    routers = os.path.join(path, MOD_ROUTERS)
    if not os.path.isfile(routers):
        raise FileNotFoundError(
            f"{path} is a Mixture-of-Depths model but lacks its routers ({MOD_ROUTERS}); save it again"
        )
    return load_file(routers)
