"""The LightningModule of one cascade stage."""

from lightning_modules.stage import StageModule

__all__ = ["StageModule"]
