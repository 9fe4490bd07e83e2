"""LLM: any Hugging Face CausalLM, by composition, plus an exit function and a threshold."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel

from cascade.exit_fn import ExitFn, exit_fn_name, get_exit_fn
from cascade.model.attention import own_masks, wants_flex_attention
from cascade.model.backbone_inputs import rows_inputs
from cascade.model.exit_classifier import CLASSIFIER_FILE, ExitClassifier
from cascade.model.families import (backbone, check_family, decoder_layers, family,
                                    find_final_norm, head_logits_function)
from cascade.model.hf_models import UNPADDED_VOCAB, load_causal_lm
from cascade.model.hidden_history import capture, keep_asked
from cascade.model.layer_loop import LayerLoop
from cascade.model.mod import MixtureOfDepths, load_routers, save_routers
from cascade.utils import eval_mode

if TYPE_CHECKING:
    from cascade.sequence_data import SequenceData


def later_stage_refused(llm: "LLM", where: str) -> str:
    """The error for a family that can only be LLM 0 of a cascade (`LLM.only_first` says why)."""
    return (
        f"{where}: {family(llm.base_llm)} can only be the first LLM of a cascade: "
        f"{llm.only_first}, so it cannot read the compacted hard tokens of a later stage at their "
        "original positions, packed several to a row; use it as LLM 0, or choose a family with "
        "rotary or learned positions"
    )


class LLM(nn.Module):
    """A Hugging Face CausalLM with early exit: its own embedding, layers and LM head do the work.

    `threshold` (a buffer, so it is in `state_dict`) is set by `collect_hard_tokens`; a token
    exits here iff its exit score is >= `threshold`.
    """

    def __init__(
        self, base_llm: PreTrainedModel, exit_fn: ExitFn | str | None = None, check: bool = True
    ):
        super().__init__()
        self.base_llm = base_llm
        self.exit_fn = get_exit_fn(exit_fn)
        self.register_buffer("threshold", torch.tensor(0.0))
        self.mod: MixtureOfDepths | None = None
        self.exit_classifier: ExitClassifier | None = None  # the learned exit function's network, once fitted
        # what the hand-over passes on: the final-norm output the head reads (default), or with this
        # the residual stream before the final norm (for the identity start of the next LLM,
        # `cascade.training.warm_start`)
        self.hands_over_residual = False
        # lists, so that these modules are not registered twice
        self._backbone = [backbone(base_llm)]
        self._layers = [decoder_layers(base_llm)]
        self._layer_loop: list[LayerLoop] = []  # built on first use
        own_masks(base_llm)  # masks built here, not by transformers (see cascade.model.attention)
        self._head_logits = head_logits_function(base_llm)  # None: the LM head alone
        try:
            self._final: list[nn.Module] | ValueError = find_final_norm(base_llm, self.layers)
        except ValueError as e:  # raised where the final norm is needed (layer exits)
            self._final = e
        self.train(base_llm.training)  # wrap without changing the model's mode
        # why the model can only be LLM 0 (later LLMs read packed rows at the tokens' original
        # positions), or None
        self.only_first = None
        if check:
            with eval_mode(self):
                final_states, logits = self._final_states, self.get_logits
                self.only_first = check_family(base_llm, self.layers, final_states, logits)

    @property
    def config(self):
        return self.base_llm.config.get_text_config()

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary; the LM head may have more rows (`pad_vocab`), never
        predicted."""
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
        if self.mod is not None:  # the layers one at a time, the routed ones on kept tokens only
            return self._forward_routed(backbone_inputs, segment_ids, history)
        with self._capture(history) as hidden_history:
            out = self._backbone[0](**backbone_inputs)
        return out.last_hidden_state, hidden_history

    def _final_states(
        self, x: Tensor, position_ids: Tensor | None = None, segment_ids: Tensor | None = None
    ) -> Tensor:
        return self(x, position_ids=position_ids, segment_ids=segment_ids, history=())[0]

    def backbone_inputs(
        self, x: Tensor, input_type: str = "token_ids", position_ids: Tensor | None = None,
        segment_ids: Tensor | None = None,
    ) -> dict:
        """What `forward` gives the model's backbone: the inputs, positions and the masks of
        `segment_ids`."""
        flex = wants_flex_attention(self.config, self.training, x.is_cuda, self.mod is not None)
        return rows_inputs(self.base_llm, x, input_type, position_ids, segment_ids, flex)

    @property
    def layer_loop(self) -> LayerLoop:
        """The model's decoder layers, callable one at a time (`cascade.model.layer_loop`);
        ValueError naming the family where its backbone does not hold them as a direct child."""
        if not self._layer_loop:
            self._layer_loop.append(LayerLoop(self._backbone[0], self.layers))
        return self._layer_loop[0]

    def _forward_routed(
        self, backbone_inputs: dict, segment_ids: Tensor | None, history: Sequence[int] | None
    ):
        """`forward` with Mixture-of-Depths: an explicit loop over the decoder layers, then the
        final norm."""
        h, calls = self.layer_loop.layer_inputs(**backbone_inputs)
        hidden_history: list[Tensor | None] = [h] + [None] * self.num_layers
        self.mod.begin(self.base_llm.config._attn_implementation, self.num_layers, segment_ids)
        h = self.layer_loop.run(h, calls, 0, self.num_layers, hidden_history, self.mod.run_layer)
        return self.final_norm(h), keep_asked(hidden_history, history)

    def head_logits(self, h: Tensor) -> Tensor:
        """Logits of final hidden states (..., D) as the model's own CausalLM computes them: its LM
        head and whatever its family does after it (soft-capping, scaling;
        `cascade.model.families`), over the head's full (padded) width."""
        if self._head_logits is not None:
            return self._head_logits(h)
        return self.base_llm.get_output_embeddings()(h)

    def get_logits(self, h: Tensor) -> Tensor:
        """The model's own logits of final hidden states `h` (..., D), over the real vocabulary
        (padded rows cut off)."""
        logits = self.head_logits(h)
        return logits if logits.shape[-1] == self.vocab_size else logits[..., : self.vocab_size]

    @property
    def final_norm(self) -> Callable[[Tensor], Tensor]:
        """The model's own map from the last layer's output to its final hidden states (its final
        norm), for the logit lens of any layer; raises ValueError naming the family where it could
        not be found."""
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
        if isinstance(self._final, ValueError):
            return []
        return [p for m in self._final for p in m.parameters()]

    def enable_mod(self, capacity: float, layers: list[int] | None = None) -> MixtureOfDepths:
        """Route `layers` (default 2, 4, ...) by Mixture-of-Depths with `capacity`: every forward
        of this LLM then runs them on the routed tokens only (see `cascade.model.mod`)."""
        self.mod = MixtureOfDepths(self.layers, self.dim, capacity, layers)
        self.layer_loop  # built here, not inside a compiled forward
        return self.mod

    @contextmanager
    def routed_by(self, mod: MixtureOfDepths) -> Iterator[MixtureOfDepths]:
        """Route the forwards inside by the Mixture-of-Depths routers `mod` (routers not enabled
        with `enable_mod`)."""
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
        if self.exit_classifier is not None:
            config.exit_classifier = {"hidden": self.exit_classifier.hidden}
        self.base_llm.save_pretrained(path)
        if self.mod is not None:
            save_routers(self.mod, path)
        if self.exit_classifier is not None:
            save_file(self.exit_classifier.state_dict(), os.path.join(path, CLASSIFIER_FILE))

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, exit_fn: ExitFn | str | None = None, **kwargs
    ) -> "LLM":
        """Load what `save_pretrained` wrote (or any HF CausalLM); `kwargs` go to
        `AutoModelForCausalLM.from_pretrained` (`cascade.model.hf_models.load_causal_lm`)."""
        base_llm = load_causal_lm(path, **kwargs)
        llm = cls(base_llm, exit_fn or getattr(base_llm.config, "exit_fn", None))
        llm.threshold.fill_(getattr(base_llm.config, "exit_threshold", 0.0))
        llm.hands_over_residual = bool(getattr(base_llm.config, "hands_over_residual", False))
        if mod := getattr(base_llm.config, "mod", None):
            routers = load_routers(path)
            llm.enable_mod(mod["capacity"], mod["layers"]).load_state_dict(routers)
        llm.load_exit_classifier(path)
        return llm

    def load_exit_classifier(self, path: str | os.PathLike) -> None:
        """Load the learned exit function's classifier saved in `path` beside this LLM's weights, if its config has one.

        Raises:
            FileNotFoundError: the config names a classifier whose file is missing.
        """
        if classifier := getattr(self.base_llm.config, "exit_classifier", None):
            file = os.path.join(path, CLASSIFIER_FILE)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{path} has a learned exit function but lacks its classifier ({CLASSIFIER_FILE}); save it again")
            self.exit_classifier = ExitClassifier(self.dim, classifier["hidden"]).eval().requires_grad_(False)
            self.exit_classifier.load_state_dict(load_file(file))

    def exit_scores(self, hidden_history: Sequence[Tensor | None], h_out: Tensor) -> Tensor:
        return self.exit_fn(hidden_history, h_out, self)

    def collect_hard_tokens(
        self, data: SequenceData, hard_ratio: float, batch_size: int
    ) -> SequenceData:
        """Set `threshold` to the `hard_ratio` quantile of the exit scores on `data` and return the
        hard tokens.

        The returned data holds, per sequence, the hard tokens' output hidden states (bf16),
        targets and original positions; sequences without a hard token are dropped.
        """
        from cascade.routing.handover import collect_hard_tokens

        return collect_hard_tokens(self, data, hard_ratio, batch_size).hard

    def transform_data(self, data: SequenceData, batch_size: int) -> SequenceData:
        """The same sequences with this LLM's output hidden states (bf16) as inputs."""
        from cascade.routing.handover import transform_data

        return transform_data(self, data, batch_size)

    def _capture(self, history: Sequence[int] | None) -> ContextManager[list[Tensor | None]]:
        """Fill a list of L + 1 hidden states by hooks on the decoder layers as the model runs."""
        return capture(self.layers, history)
