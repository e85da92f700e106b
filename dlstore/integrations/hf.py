"""A Hugging Face `transformers` TrainerCallback that logs a training run into a dlstore store.

    trainer = transformers.Trainer(..., callbacks=[DlstoreTrainerCallback(store, zoo="ft")])

The run's config is the TrainingArguments (and the model's config, when it has one) plus
`config`; its metrics are what the trainer logs (`logging_steps`, evaluations) by global step; a
checkpoint is saved at every save of the trainer (`save_steps` / `save_strategy`), by global
step. The run is complete when training ends; a run whose process dies shows as `died`.
"""

from __future__ import annotations

from transformers import TrainerCallback

from dlstore.integrations import TrackingCallback, scalars


class DlstoreTrainerCallback(TrackingCallback, TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        config = {"training_args": args.to_dict()}
        if model is not None and hasattr(getattr(model, "config", None), "to_dict"):
            config["model_config"] = model.config.to_dict()
        self.start(config)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._steps is not None and logs:
            self._steps.log(state.global_step, scalars(logs))

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.run is not None and model is not None:
            self.run.save(state.global_step, model)

    def on_train_end(self, args, state, control, **kwargs):
        if self.run is not None:
            self.run.close()
