"""Callbacks of the cascade: the hand-over between stages."""

from callbacks.stage_handover import StageHandover

__all__ = ["StageHandover"]
