"""Exit functions: one score per token, high = easy (the token exits), low = hard (it goes on).

An exit function receives what `LLM.forward` returns, `hidden_history` and `h_out`, plus the
`LLM` itself (for functions that read the LM head). `hidden_history[i]` is the residual stream
after decoder layer i (`hidden_history[0]` is the input to layer 1, `hidden_history[-1]` the
raw output of the last layer, before the final norm); `h_out` is the final-norm output that
the LM head reads.

A function may declare which entries of `hidden_history` it reads with the `history`
attribute (see `reads_history`); the LLM then captures only those instead of every layer's.
A function without the attribute gets the full history.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Protocol, Sequence

import torch.nn.functional as F
from torch import Tensor


class ExitHead(Protocol):
    """What an exit function may read of the `LLM` beside its hidden states: its logits, and its learned exit
    network (None until fitted)."""

    exit_classifier: Callable[[Tensor], Tensor] | None

    def get_logits(self, h: Tensor) -> Tensor: ...


class ExitFn(Protocol):
    def __call__(self, hidden_history: Sequence[Tensor | None], h_out: Tensor, llm: ExitHead) -> Tensor:
        """Return exit scores of shape h_out.shape[:-1]; high = easy."""
        ...


def reads_history(*indices: int) -> Callable[[ExitFn], ExitFn]:
    """Declare the entries of `hidden_history` an exit function reads (none: it reads `h_out` only)."""

    def mark(fn: ExitFn) -> ExitFn:
        fn.history = tuple(indices)
        return fn

    return mark


def compute_cos_sim(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity over the last dimension, in float32."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


@reads_history(-2, -1)
def default_exit_fn(hidden_history: Sequence[Tensor | None], h_out: Tensor, llm: ExitHead) -> Tensor:
    """CALM's "state" measure: cosine between the residual stream entering and leaving the last layer.

    Both vectors are raw residual-stream states (before the final norm), so like is compared
    with like; `h_out` is not used because the final norm would change the comparison.
    High = the last layer changed the token little = easy.
    """
    return compute_cos_sim(hidden_history[-2], hidden_history[-1])


def _probs(h_out: Tensor, llm: ExitHead) -> Tensor:
    return llm.get_logits(h_out).float().softmax(dim=-1)


@reads_history()
def max_prob_exit_fn(hidden_history: Sequence[Tensor | None], h_out: Tensor, llm: ExitHead) -> Tensor:
    """Max softmax probability of the LLM's own prediction (Teerapittayanon et al.; CALM "softmax")."""
    return _probs(h_out, llm).amax(dim=-1)


@reads_history()
def top2_margin_exit_fn(hidden_history: Sequence[Tensor | None], h_out: Tensor, llm: ExitHead) -> Tensor:
    """Difference between the two largest softmax probabilities (CALM's softmax margin)."""
    top2 = _probs(h_out, llm).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@reads_history()
def neg_entropy_exit_fn(hidden_history: Sequence[Tensor | None], h_out: Tensor, llm: ExitHead) -> Tensor:
    """Negative entropy (nats) of the predicted distribution: a peaked prediction scores high."""
    log_probs = llm.get_logits(h_out).float().log_softmax(dim=-1)
    return (log_probs.exp() * log_probs).sum(dim=-1)


@reads_history()
def learned_exit_fn(hidden_history: Sequence[Tensor | None], h_out: Tensor, llm: ExitHead) -> Tensor:
    """The token loss the LLM's fitted exit classifier predicts from its final hidden state, negated: tokens it
    expects to predict well exit (see `cascade.model.exit_classifier`; CALM's early-exit classifier, Schuster et al.
    2022)."""
    if llm.exit_classifier is None:
        raise ValueError("the learned exit function needs the LLM's exit classifier: fit it first "
                         "(cascade.routing.learned_exit.fit_exit_classifier)")
    return -llm.exit_classifier(h_out).float()


LEARNED = "learned"  # the name of `learned_exit_fn`; not in EXIT_FNS, whose functions need nothing fitted

EXIT_FNS: MappingProxyType[str, ExitFn] = MappingProxyType(
    {
        "cosine": default_exit_fn,
        "max_prob": max_prob_exit_fn,
        "top2_margin": top2_margin_exit_fn,
        "neg_entropy": neg_entropy_exit_fn,
    }
)


def get_exit_fn(exit_fn: str | ExitFn | None) -> ExitFn:
    """Resolve an exit function given by name (see `EXIT_FNS`), as a callable, or None (the default)."""
    if exit_fn is None:
        return default_exit_fn
    if callable(exit_fn):
        return exit_fn
    if exit_fn == LEARNED:
        return learned_exit_fn
    if exit_fn not in EXIT_FNS:
        raise ValueError(f"unknown exit function {exit_fn!r}; choose one of {sorted([*EXIT_FNS, LEARNED])} or pass a callable")
    return EXIT_FNS[exit_fn]


def exit_fn_name(exit_fn: ExitFn) -> str | None:
    """The name under which `exit_fn` is in `EXIT_FNS`, or None for a custom function."""
    return LEARNED if exit_fn is learned_exit_fn else next((name for name, fn in EXIT_FNS.items() if fn is exit_fn), None)


def history_indices(exit_fn: ExitFn) -> tuple[int, ...] | None:
    """The `hidden_history` entries `exit_fn` reads; None means all of them."""
    return getattr(exit_fn, "history", None)
