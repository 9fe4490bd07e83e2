"""A learned exit function: an early-exit classifier, a small network on an LLM's final hidden state that predicts
the LLM's own token loss.

Target: the LLM's next-token loss on each token. A later LLM is trained on the tokens an LLM hands over, but it does
not exist yet when the hand-over chooses them, so what it could gain cannot be measured then; the tokens the LLM
itself predicts worst are those with the most left to gain, and the diagnostics show the scores that track that loss
(max_prob, neg_entropy) finding hard tokens better than the cosine between layers. A predictor of the loss fitted on
the same final state those scores read can weigh its features as the data says. The exit score is the predicted
loss negated (low = hard, as every exit score), calibrated to `hard_ratio` by the same exact quantile as the others.

References: the learned early-exit classifier of CALM (Schuster et al. 2022, "Confident Adaptive Language Modeling")
and the halting classifiers of the Depth-Adaptive Transformer (Elbayad et al. 2020).
"""

from __future__ import annotations

from torch import Tensor, nn

CLASSIFIER_FILE = "exit_classifier.safetensors"  # beside the HF weights of an LLM with a learned exit function


class ExitClassifier(nn.Module):
    """(…, D) final hidden states -> (…,) predicted token loss, standardised (only its order matters)."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h.to(self.net[1].weight.dtype)).squeeze(-1)
