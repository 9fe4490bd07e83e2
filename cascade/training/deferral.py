"""The joint objective of a cascade's stage k > 0: LLM k and a deferral head on LLM k-1's output trained together by
the likelihood of their token-level mixture (Co-LLM: Shen et al. 2024, "Learning to Decode Collaboratively with
Multiple Language Models"). The head's probability pi of deferring a token to LLM k weighs, in the gradient, how much
LLM k learns from it, so that LLM k specialises on the tokens it is deferred; at evaluation the head is LLM k-1's exit
classifier (exit score: its logit negated), calibrated to hand on `hard_ratio` as every exit function is: a hard, true
early exit (`callbacks.gain_router`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cascade.llm import LLM
from cascade.model.exit_classifier import ExitClassifier
from cascade.sequence_data import IGNORE_INDEX, Batch
from cascade.training.losses import mixture_nll, next_token_loss


class Deferral(nn.Module):
    """The deferral head on `previous` (LLM k-1, frozen; not a submodule) and the mixture loss of LLM k with it.

    Args:
        previous: LLM k-1, whose output (its final-norm states) the head reads and whose predictions the mixture takes.
        hard_ratio: The head starts deferring every token with this probability (its last layer zero, its bias the
            logit of `hard_ratio`), so that LLM k learns from every token at first.
        hidden: Width of the head's hidden layer.
    """

    def __init__(self, previous: LLM, hard_ratio: float, hidden: int = 128):
        super().__init__()
        self.head = ExitClassifier(previous.dim, hidden)
        nn.init.zeros_(self.head.net[-1].weight)
        nn.init.constant_(self.head.net[-1].bias, math.log(hard_ratio / (1 - hard_ratio)))
        self._previous = [previous]

    @property
    def previous(self) -> LLM:
        return self._previous[0]

    def previous_states(self, inputs: Tensor) -> Tensor:
        """LLM k-1's final-norm states (B, T, D) of what it handed over, `inputs` (B, T, D): themselves, or where it
        hands over its residual stream (`LLM.hands_over_residual`) that stream through its final norm."""
        previous = self.previous
        h = inputs.to(previous.base_llm.dtype)
        return previous.final_norm(h) if previous.hands_over_residual else h

    def loss(self, llm: LLM, batch: Batch) -> tuple[Tensor, Tensor]:
        """The mixture's mean negative log-likelihood over the batch's real tokens (`mixture_nll`), LLM k = `llm`
        reading the batch, and the mean deferral probability; gradients reach `llm` and the head, not LLM k-1."""
        h_out, _ = llm(batch.inputs, batch.input_type, batch.model_position_ids(), batch.model_segment_ids(), history=())
        with torch.no_grad():
            states = self.previous_states(batch.inputs)
            logp_previous = -next_token_loss(self.previous, states, batch.targets, reduction="none")
        defer_logit = self.head(states)
        nll = mixture_nll(logp_previous, -next_token_loss(llm, h_out, batch.targets, reduction="none"), defer_logit)
        real = batch.targets != IGNORE_INDEX
        return nll[real].mean(), torch.sigmoid(defer_logit.detach()[real]).mean()

    def exit_classifier(self) -> ExitClassifier:
        """A frozen copy of the head, as LLM k-1's exit classifier (`learned_exit_fn` negates its output)."""
        classifier = ExitClassifier(self.previous.dim, self.head.hidden)
        classifier.load_state_dict(self.head.state_dict())
        return classifier.to(self.previous.device).eval().requires_grad_(False)
