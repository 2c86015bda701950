"""Training on Ray Train + DeepSpeed. ``stage`` is the public contract a stage implements; ``registry`` declares
every stage once (config, run function, inputs, default run name); ``core/`` is the loop machinery the stages
share; ``stages/`` holds pretraining, SFT, distillation and GRPO. Importing this package imports nothing heavy.
"""
