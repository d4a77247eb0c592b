"""The training step: the LightningModule and the pieces it orders (scoring, optimizer step, parallel)."""
