"""Callbacks of the cascade: the hand-over between stages."""

from callbacks.handover import StageHandover

__all__ = ["StageHandover"]
