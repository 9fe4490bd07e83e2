"""ProvenanceStamp: every checkpoint of a stage carries what defines the stage (`cascade.run.provenance`)."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

RECORD = "cascade_fingerprint"


class ProvenanceStamp(Callback):
    """Writes `fingerprint` (the stage's settings, data and the weights it trained after) into each checkpoint."""

    def __init__(self, fingerprint: dict):
        self.fingerprint = fingerprint

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        checkpoint[RECORD] = self.fingerprint
