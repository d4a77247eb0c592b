"""State that a resumed run must not lose: the run of skipped steps (a run near ``max_consecutive_skips`` must
stop at the same step whether or not it was interrupted) and the validation history behind the end-of-fit
summary."""

from __future__ import annotations

from lit_gcpo.training.module import GRPOModule


def test_skips_and_validation_history_survive_a_checkpoint(tiny_model_dir):
    saved = GRPOModule(model=tiny_model_dir, export_dir=None)
    saved.guarded_step.skipped, saved.guarded_step.consecutive = 5, 3
    saved.validation.history = [(0, 0.25), (50, 0.375)]
    checkpoint: dict = {}
    saved.on_save_checkpoint(checkpoint)
    restored = GRPOModule(model=tiny_model_dir, export_dir=None)
    restored.on_load_checkpoint(checkpoint)
    assert restored.skipped_steps == 5 and restored.guarded_step.consecutive == 3
    assert restored.validation_history == [(0, 0.25), (50, 0.375)]


def test_a_checkpoint_of_an_older_version_restores_what_it_has(tiny_model_dir):
    module = GRPOModule(model=tiny_model_dir, export_dir=None)
    module.on_load_checkpoint({"lit_gcpo": {"skipped_steps": 2}})
    assert module.skipped_steps == 2 and module.guarded_step.consecutive == 0 and module.validation_history == []
