"""The training stages on the shared loop: pretraining, SFT, distillation and GRPO (its own package). Each is a
``r1ray.train.stage.Stage`` with its config and a ``run`` function, declared once in ``r1ray.train.registry``."""
