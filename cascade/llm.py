"""LLM: any Hugging Face CausalLM, by composition, plus an exit function and a threshold."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from cascade.exit_fn import ExitFn, exit_fn_name, get_exit_fn
from cascade.model.attention import ATTENTION, own_masks, packed_rows_mask
from cascade.model.exit_router import ROUTER_FILE, ExitRouter
from cascade.model.families import (backbone, check_family, decoder_layers, family, find_final_norm,
                                    head_logits_function)
from cascade.model.hf_models import UNPADDED_VOCAB, supports_sdpa
from cascade.model.layer_loop import LayerLoop
from cascade.model.mod import MixtureOfDepths
from cascade.utils import eval_mode

if TYPE_CHECKING:
    from cascade.sequence_data import SequenceData

INPUT_TYPES = ("token_ids", "hidden_states")
MOD_ROUTERS = "mod_routers.safetensors"  # beside the HF weights of a Mixture-of-Depths model


def later_stage_refused(llm: "LLM", where: str) -> str:
    """The error for a family that can only be LLM 0 of a cascade (`LLM.only_first` says why)."""
    return (
        f"{where}: {family(llm.base_llm)} can only be the first LLM of a cascade: {llm.only_first}, so it cannot "
        "read the compacted hard tokens of a later stage at their original positions, packed several to a row; use "
        "it as LLM 0, or choose a family with rotary or learned positions"
    )


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class LLM(nn.Module):
    """A Hugging Face CausalLM with early exit: its own embedding, layers and LM head do all the work.

    `threshold` (a buffer, so it is in `state_dict`) is set by `collect_hard_tokens`; a token
    exits here iff its exit score is >= `threshold`.
    """

    def __init__(self, base_llm: PreTrainedModel, exit_fn: ExitFn | str | None = None, check: bool = True):
        super().__init__()
        self.base_llm = base_llm
        self.exit_fn = get_exit_fn(exit_fn)
        self.register_buffer("threshold", torch.tensor(0.0))
        self.mod: MixtureOfDepths | None = None
        self.exit_router: ExitRouter | None = None  # the learned exit function's network, once fitted
        # what the hand-over passes on: the final-norm output the head reads (default), or with this the residual
        # stream before the final norm (for the identity start of the next LLM, `cascade.training.warm_start`)
        self.hands_over_residual = False
        self._backbone = [backbone(base_llm)]  # lists, so that these modules are not registered twice
        self._layers = [decoder_layers(base_llm)]
        self._layer_loop: list[LayerLoop] = []  # built on first use
        own_masks(base_llm)  # masks built here, not by transformers (see cascade.model.attention)
        self._head_logits = head_logits_function(base_llm)  # None: the LM head alone
        try:
            self._final: list[nn.Module] | ValueError = find_final_norm(base_llm, self.layers)
        except ValueError as e:  # raised where the final norm is needed (layer exits)
            self._final = e
        self.train(base_llm.training)  # wrap without changing the model's mode
        # why the model can only be LLM 0 (later LLMs read packed rows at the tokens' original positions), or None
        self.only_first = None
        if check:
            with eval_mode(self):
                self.only_first = check_family(base_llm, self.layers, self._final_states, self.get_logits)

    @property
    def config(self):
        return self.base_llm.config.get_text_config()

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary; the LM head may have more rows (`pad_vocab`), never predicted."""
        return getattr(self.config, UNPADDED_VOCAB, None) or self.config.vocab_size

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def device(self) -> torch.device:
        return self.threshold.device

    @property
    def layers(self) -> nn.ModuleList:
        return self._layers[0]

    def forward(
        self,
        x: Tensor,
        input_type: str = "token_ids",
        position_ids: Tensor | None = None,
        segment_ids: Tensor | None = None,
        history: Sequence[int] | None = None,
    ) -> tuple[Tensor, list[Tensor | None]]:
        """Run the model on token ids (B, T) or hidden states (B, T, D).

        `position_ids` (B, T) are the tokens' original positions (default 0..T-1).
        `segment_ids` (B, T) say which sequence of its row each token belongs to (-1 for
        padding): a token attends only to earlier tokens of its own segment. None means each
        row is one sequence (plain causal attention).
        `history` lists the entries of `hidden_history` to capture (None: all).

        Returns `h_out` (B, T, D), the final-norm output the LM head reads, and
        `hidden_history`, L + 1 entries: [i] is the residual stream after layer i ([0]: the
        input to layer 1); entries not asked for are None.
        """
        backbone_inputs = self.backbone_inputs(x, input_type, position_ids, segment_ids)
        if self.mod is not None:  # the layers one at a time, the routed ones on their kept tokens only
            return self._forward_routed(backbone_inputs, segment_ids, history)
        with self._capture(history) as hidden_history:
            out = self._backbone[0](**backbone_inputs)
        return out.last_hidden_state, hidden_history

    def _final_states(self, x: Tensor, position_ids: Tensor | None = None, segment_ids: Tensor | None = None) -> Tensor:
        return self(x, position_ids=position_ids, segment_ids=segment_ids, history=())[0]

    def backbone_inputs(self, x: Tensor, input_type: str = "token_ids", position_ids: Tensor | None = None,
                        segment_ids: Tensor | None = None) -> dict:
        """What `forward` gives the model's backbone: the inputs, positions and the masks of `segment_ids`."""
        if input_type not in INPUT_TYPES:
            raise ValueError(f"input_type must be one of {INPUT_TYPES}, got {input_type!r}")
        if input_type == "token_ids":
            inputs = {"input_ids": x}
        else:
            if x.shape[-1] != self.dim:
                raise ValueError(f"hidden states of width {x.shape[-1]} given to an LLM of width {self.dim}")
            inputs = {"inputs_embeds": x.to(self.base_llm.get_input_embeddings().weight.dtype)}
        implementation = self.base_llm.config._attn_implementation
        if segment_ids is not None:
            flex = self.training and x.is_cuda and self.mod is None  # Mixture-of-Depths gathers 4D masks per layer
            dtype = self.base_llm.get_input_embeddings().weight.dtype
            masks = packed_rows_mask(segment_ids, implementation, flex, dtype, self.config)
        elif position_ids is None or implementation == ATTENTION:
            masks = {}  # plain causal rows: SDPA's is_causal kernel (see cascade.model.attention)
        else:
            # An explicit all-ones mask: with none, transformers would read gaps in position_ids
            # (normal at stage k > 0) as boundaries of packed sequences.
            masks = {"attention_mask": torch.ones(x.shape[:2], dtype=torch.long, device=x.device)}
        return {**inputs, "position_ids": position_ids, **masks, "use_cache": False}

    @property
    def layer_loop(self) -> LayerLoop:
        """The model's decoder layers, callable one at a time (`cascade.model.layer_loop`); ValueError naming the family
        where its backbone does not hold them as a direct child."""
        if not self._layer_loop:
            self._layer_loop.append(LayerLoop(self._backbone[0], self.layers))
        return self._layer_loop[0]

    def _forward_routed(self, backbone_inputs: dict, segment_ids: Tensor | None, history: Sequence[int] | None):
        """`forward` with Mixture-of-Depths: an explicit loop over the decoder layers, then the final norm."""
        count = self.num_layers + 1
        h, calls = self.layer_loop.layer_inputs(**backbone_inputs)
        hidden_history: list[Tensor | None] = [h] + [None] * self.num_layers
        self.mod.begin(self.base_llm.config._attn_implementation, self.num_layers, segment_ids)
        h = self.layer_loop.run(h, calls, 0, self.num_layers, hidden_history, self.mod.run_layer)
        if history is not None:
            wanted = {i % count for i in history}
            hidden_history = [t if i in wanted else None for i, t in enumerate(hidden_history)]
        return self.final_norm(h), hidden_history

    def head_logits(self, h: Tensor) -> Tensor:
        """Logits of final hidden states (..., D) as the model's own CausalLM computes them: its LM head and whatever
        its family does after it (soft-capping, scaling; `cascade.model.families`), over the head's full (padded) width."""
        return self._head_logits(h) if self._head_logits is not None else self.base_llm.get_output_embeddings()(h)

    def get_logits(self, h: Tensor) -> Tensor:
        """The model's own logits of final hidden states `h` (..., D), over the real vocabulary (padded rows cut off)."""
        logits = self.head_logits(h)
        return logits if logits.shape[-1] == self.vocab_size else logits[..., : self.vocab_size]

    @property
    def final_norm(self) -> Callable[[Tensor], Tensor]:
        """The model's own map from the last layer's output to its final hidden states (its final norm), for the logit
        lens of any layer; raises ValueError naming the family where it could not be found."""
        if isinstance(self._final, ValueError):
            raise self._final
        modules = self._final

        def apply(h: Tensor) -> Tensor:
            for module in modules:
                h = module(h)
            return h

        return apply

    @property
    def final_norm_parameters(self) -> list[nn.Parameter]:
        return [] if isinstance(self._final, ValueError) else [p for m in self._final for p in m.parameters()]

    def enable_mod(self, capacity: float, layers: list[int] | None = None) -> MixtureOfDepths:
        """Route `layers` (default 2, 4, ...) by Mixture-of-Depths with `capacity`: every forward
        of this LLM then runs them on the routed tokens only (see `cascade.model.mod`)."""
        self.mod = MixtureOfDepths(self.layers, self.dim, capacity, layers)
        self.layer_loop  # built here, not inside a compiled forward
        return self.mod

    @contextmanager
    def routed_by(self, mod: MixtureOfDepths) -> Iterator[MixtureOfDepths]:
        """Route the forwards inside by the Mixture-of-Depths routers `mod` (routers not enabled with `enable_mod`)."""
        before = self.mod
        self.layer_loop  # built here, not inside a compiled forward
        self.mod = mod
        try:
            yield mod
        finally:
            self.mod = before

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save in Hugging Face format; the threshold and exit function name go into config.json."""
        config = self.base_llm.config
        config.exit_threshold = float(self.threshold)
        config.exit_fn = exit_fn_name(self.exit_fn)
        config.hands_over_residual = self.hands_over_residual
        if self.mod is not None:
            config.mod = {"capacity": self.mod.capacity, "layers": self.mod.layers}
        if self.exit_router is not None:
            config.exit_router = {"hidden": self.exit_router.hidden}
        self.base_llm.save_pretrained(path)
        if self.mod is not None:
            save_file(self.mod.state_dict(), os.path.join(path, MOD_ROUTERS))
        if self.exit_router is not None:
            save_file(self.exit_router.state_dict(), os.path.join(path, ROUTER_FILE))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, exit_fn: ExitFn | str | None = None, **kwargs) -> "LLM":
        """Load what `save_pretrained` wrote (or any HF CausalLM); `kwargs` go to `AutoModelForCausalLM.from_pretrained`."""
        if "attn_implementation" not in kwargs:  # SDPA where the family has it (the masks cascade gives), else eager
            kwargs["attn_implementation"] = "sdpa" if supports_sdpa(AutoConfig.from_pretrained(path)) else "eager"
        base_llm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        llm = cls(base_llm, exit_fn or getattr(base_llm.config, "exit_fn", None))
        llm.threshold.fill_(getattr(base_llm.config, "exit_threshold", 0.0))
        llm.hands_over_residual = bool(getattr(base_llm.config, "hands_over_residual", False))
        if mod := getattr(base_llm.config, "mod", None):
            routers = os.path.join(path, MOD_ROUTERS)
            if not os.path.isfile(routers):
                raise FileNotFoundError(f"{path} is a Mixture-of-Depths model but lacks its routers ({MOD_ROUTERS}); save it again")
            llm.enable_mod(mod["capacity"], mod["layers"]).load_state_dict(load_file(routers))
        llm.load_exit_router(path)
        return llm

    def load_exit_router(self, path: str | os.PathLike) -> None:
        """Load the learned exit function's router saved in `path` beside this LLM's weights, if its config has one.

        Raises:
            FileNotFoundError: the config names a router whose file is missing.
        """
        if router := getattr(self.base_llm.config, "exit_router", None):
            file = os.path.join(path, ROUTER_FILE)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{path} has a learned exit function but lacks its router ({ROUTER_FILE}); save it again")
            self.exit_router = ExitRouter(self.dim, router["hidden"]).eval().requires_grad_(False)
            self.exit_router.load_state_dict(load_file(file))

    def exit_scores(self, hidden_history: Sequence[Tensor | None], h_out: Tensor) -> Tensor:
        return self.exit_fn(hidden_history, h_out, self)

    def collect_hard_tokens(self, data: SequenceData, hard_ratio: float, batch_size: int) -> SequenceData:
        """Set `threshold` to the `hard_ratio` quantile of the exit scores on `data` and return the hard tokens.

        The returned data holds, per sequence, the hard tokens' output hidden states (bf16),
        targets and original positions; sequences without a hard token are dropped.
        """
        from cascade.routing.handover import collect_hard_tokens

        return collect_hard_tokens(self, data, hard_ratio, batch_size).hard

    def transform_data(self, data: SequenceData, batch_size: int) -> SequenceData:
        """The same sequences with this LLM's output hidden states (bf16) as inputs."""
        from cascade.routing.handover import transform_data

        return transform_data(self, data, batch_size)

    @contextmanager
    def _capture(self, history: Sequence[int] | None) -> Iterator[list[Tensor | None]]:
        """Fill a list of L + 1 hidden states by hooks on the decoder layers while the model runs."""
        count = self.num_layers + 1
        wanted = range(count) if history is None else sorted({i % count for i in history})
        captured: list[Tensor | None] = [None] * count
        handles = []
        for i in wanted:
            if i == 0:

                def grab_input(module, args, kwargs):
                    captured[0] = args[0] if args else kwargs["hidden_states"]

                handles.append(self.layers[0].register_forward_pre_hook(grab_input, with_kwargs=True))
            else:

                def grab_output(module, args, output, i=i):
                    captured[i] = _first(output)

                handles.append(self.layers[i - 1].register_forward_hook(grab_output))
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()
