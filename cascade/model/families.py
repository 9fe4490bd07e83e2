# long: every check a wrapped family must pass, with the forward plumbing they share; the position probe grew with models of few positions
"""What differs between Hugging Face CausalLM families, found from what each model does, not from a list of names.

- `head_logits`: the logits of final hidden states as the family's own CausalLM forward computes them, LM head and
  whatever it does after (Gemma 2's soft-capping, Cohere's scale, Granite's divisor, ...). Families that do nothing
  after the head take the LM head alone; the others run their own forward's code on the given states.
- `find_final_norm`: the module(s) the base model applies to the last decoder layer's output, found by the order in
  which a forward calls them.
- `check_family`: tiny forwards at wrapping that a model must pass to be run exactly: attention in every layer, each
  layer called once, its logits reproduced, causal, sequences packed in a row computed as alone; and whether it can
  be a later LLM of a cascade (it must read `position_ids`: ALiBi and masks-as-positions families do not).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from cascade.model.hf_models import max_positions

# (x (B, T) token ids, position_ids=None, segment_ids=None) -> the final hidden states (B, T, D) the LM head reads
Forward = Callable[..., Tensor]


class FamilyRefused(ValueError):
    """A family that cascade cannot run exactly; the message names it and says why."""


def family(model: PreTrainedModel) -> str:
    return f"{type(model).__name__} (model type {model.config.model_type!r})"


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's decoder layers: the ModuleList of `num_hidden_layers` modules in its base model."""
    n = model.config.get_text_config().num_hidden_layers
    for module in backbone(model).modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}: no nn.ModuleList of that length")


def backbone(model: PreTrainedModel) -> nn.Module:
    """The CausalLM's base model: embeddings, decoder layers and final norm (its `get_decoder()`, where that is not
    the CausalLM itself; else its `base_model`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if isinstance(decoder, nn.Module) and decoder is not model else model.base_model


class _AfterBaseModel:
    """Stands in for a CausalLM inside its own `forward`, with its base model answering `hidden` at once: what the
    forward does after the base model (the LM head and any processing of its output) runs on `hidden`."""

    def __init__(self, model: PreTrainedModel, hidden: Tensor):
        self._model, self._hidden, self._backbone = model, hidden, backbone(model)

    def __getattr__(self, name: str):
        value = getattr(self._model, name)
        return _BaseModelStub(value, self._hidden) if value is self._backbone else value


class _StubOutputs(BaseModelOutputWithPast):
    """The base model's outputs where only the final hidden states are known; any other field (router logits,
    auxiliary losses) reads None, as when the model was not asked for it."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class _BaseModelStub:
    def __init__(self, base: nn.Module, hidden: Tensor):
        self._base, self._hidden = base, hidden

    def __call__(self, *args, **kwargs) -> BaseModelOutputWithPast:
        return _StubOutputs(last_hidden_state=self._hidden)

    def __getattr__(self, name: str):
        return getattr(self._base, name)


def own_head_logits(model: PreTrainedModel, h: Tensor) -> Tensor:
    """Logits of final hidden states `h` (..., D) computed by the model's own CausalLM forward after its base model."""
    rows = h if h.dim() == 3 else h.reshape(1, -1, h.shape[-1])  # (B, T, D) as the forward has them
    out = type(model).forward(_AfterBaseModel(model, rows), input_ids=None, use_cache=False, logits_to_keep=0)
    return out.logits.reshape(*h.shape[:-1], -1)


def head_logits_function(model: PreTrainedModel) -> Callable[[Tensor], Tensor] | None:
    """None where the family's logits are its LM head's output; else a function of final hidden states that runs
    the family's own post-processing (found by comparing the two on large random states)."""
    head = model.get_output_embeddings()
    weight = head.weight
    h = 8 * torch.randn(1, 3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    with torch.no_grad():
        plain = head(h)
        try:
            own = own_head_logits(model, h)
        except Exception:  # a forward this stand-in cannot run: the wrapping's check compares with the model itself
            return None
    if own.shape == plain.shape and torch.equal(own, plain):
        return None
    return lambda states: own_head_logits(model, states)


def find_final_norm(model: PreTrainedModel, layers: nn.ModuleList) -> list[nn.Module]:
    """The modules the base model applies, in order, to the last decoder layer's output to make its final hidden
    states (usually one norm: `norm`, `ln_f`, `final_layernorm`, ...; none for a model without). Found from the order
    of the calls in a forward; raises ValueError naming the family where they do not reproduce the output."""
    parent = next((m for m in backbone(model).modules() if any(c is layers for c in m.children())), None)
    if parent is None:
        raise ValueError(f"cannot find the module holding the decoder layers of {family(model)}")
    calls: list[tuple[nn.Module, Tensor]] = []
    last = layers[-1]
    watched = [last, *(c for c in parent.children() if c is not layers)]
    handles = [m.register_forward_hook(lambda m, a, out: calls.append((m, out[0] if isinstance(out, (tuple, list)) else out)))
               for m in watched]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = backbone(model)(input_ids=_probe_ids(model, 1, 6), use_cache=False)
            after = [i for i, (m, _) in enumerate(calls) if m is last][-1]
            modules, h = [m for m, _ in calls[after + 1 :]], calls[after][1]
            for m in modules:
                h = m(h)
        if not torch.allclose(h.float(), out.last_hidden_state.float(), atol=1e-5, rtol=1e-4):
            raise ValueError("they do not reproduce its output")
    except Exception as e:
        raise ValueError(f"cannot tell which modules of {family(model)} follow its last decoder layer ({e})") from None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return modules


def _reads_context(forward: Forward, x: Tensor, h: Tensor, vocab: int) -> bool:
    """Whether the outputs after the first token change with the first token."""
    changed = x.clone()
    changed[0, 0] = (changed[0, 0] + 1) % vocab
    return not _close(forward(changed)[:, 1:], h[:, 1:])


def _probe_ids(model: PreTrainedModel, batch: int, length: int) -> Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    seeded = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, length), generator=seeded).to(device)


def _close(a: Tensor, b: Tensor) -> bool:
    tol = 1e-4 if a.dtype == torch.float32 else 2e-2
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


@torch.no_grad()
def check_family(model: PreTrainedModel, layers: nn.ModuleList, forward: Forward, logits: Callable[[Tensor], Tensor]) -> str | None:
    """Tiny forwards that a wrapping of `model` must pass to run it exactly (raises FamilyRefused, a ValueError naming
    the family and why, otherwise): `forward` is the wrapping's forward through the decoder `layers` (in eval mode),
    `logits` its logits of final hidden states. Returns why it can only be LLM 0 of a cascade (which sees whole windows
    in order), or None: later LLMs read packed rows of compacted tokens at their original positions, which a family
    that takes positions from token order (ALiBi, positions from the mask) or cannot take a block-causal mask cannot
    honour."""
    name = family(model)
    try:
        return _check_family(model, layers, forward, logits, name)
    except FamilyRefused:
        raise
    except Exception as e:  # the model's own code fails on what cascade gives it
        raise FamilyRefused(
            f"{name} cannot be run by cascade: its forward fails on the inputs cascade gives it (hidden states, "
            f"position ids: {type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e


SOFTMAX_ATTENTION = {"full_attention", "sliding_attention", "chunked_attention"}  # transformers' layer_types


def _has_attention(layer: nn.Module) -> bool:
    return any("attention" in type(m).__name__.lower() or "attn" in type(m).__name__.lower() for m in layer.modules())


def _check_kinds(layers: nn.ModuleList, config, name: str) -> None:
    """Refuse layers that are not softmax attention."""
    other = sorted(set(getattr(config, "layer_types", None) or ()) - SOFTMAX_ATTENTION)
    if other:
        raise FamilyRefused(
            f"{name} has layers of kind {other}, not softmax attention (linear attention, state-space or convolution "
            "layers carry a state along a row, across the sequences cascade packs into it)"
        )
    if not all(_has_attention(layer) for layer in layers):
        raise FamilyRefused(
            f"{name} has decoder layers without attention (state-space, recurrent or convolution layers): they carry "
            "information along a row, across the sequences cascade packs into it, and past the tokens a stage drops"
        )


def _check_family(model: PreTrainedModel, layers: nn.ModuleList, forward: Forward, logits: Callable[[Tensor], Tensor],
                  name: str) -> str | None:
    """`check_family`'s forwards (no gradients)."""
    _check_kinds(layers, model.config.get_text_config(), name)
    x = _probe_ids(model, 1, 12)
    reference = model(input_ids=x, use_cache=False).logits
    calls = [0] * len(layers)
    counting = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
                for i, layer in enumerate(layers)]
    try:
        h = forward(x)
    finally:
        for handle in counting:
            handle.remove()
    if calls != [1] * len(calls):
        raise FamilyRefused(
            f"{name} calls its decoder layers {calls} times in a forward (a looped or recurrent-depth model): the "
            "residual stream after each layer, which exit scores and layer exits read, is not defined"
        )
    own = logits(h)
    if not _close(own, reference[..., : own.shape[-1]]):
        raise FamilyRefused(f"{name}: its logits cannot be reproduced from its final states and LM head")
    vocab = model.get_input_embeddings().weight.shape[0]
    changed = x.clone()
    changed[0, -1] = (changed[0, -1] + 1) % vocab
    if not _close(forward(changed)[:, :-1], h[:, :-1]):
        raise FamilyRefused(f"{name} is not a causal LM: a later token changes the outputs of earlier ones")
    limit = max_positions(model.config.get_text_config())
    return _check_positions(forward, x, h, vocab, name, limit)


def _check_positions(forward: Forward, x: Tensor, h: Tensor, vocab: int, name: str, limit: int | None):
    """Packed rows computed as alone; positions read from `position_ids` within `limit` (else: LLM 0 only)."""
    lengths = (5, 4, 3)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(x.device)
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None].to(x.device)
    try:
        packed = forward(x, position_ids=positions, segment_ids=segments)
    except Exception as e:
        return f"it cannot take the block-causal mask of packed rows ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    alone = torch.cat([forward(part) for part in x.split(lengths, dim=1)], dim=1)
    if not _close(packed, alone):
        raise FamilyRefused(
            f"{name}: a sequence packed in a row with others is not computed as it is alone (an attention pattern "
            "cascade cannot express); cascade packs the hard tokens of several sequences into a row"
        )
    if limit is not None and limit <= 12:
        return None  # no room for a gap between 12 positions: nothing to tell apart
    gapped = torch.tensor([[0, 1, 2, 6, 7, 11, 12, 13, 17, 18, 19, 20]], device=x.device)
    if limit is not None and limit <= 20:  # the 12 positions spread, with gaps, within the model's
        gapped = torch.linspace(0, limit - 1, 12, device=x.device).round().long()[None]
    # weights that ignore context (an identity start) ignore positions too
    if _close(forward(x, position_ids=gapped), h) and _reads_context(forward, x, h, vocab):
        return "it takes its positions from the order of its tokens (ALiBi, or positions from the attention mask), not from position_ids"
    return None
