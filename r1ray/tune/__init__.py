"""Ray Tune over any training stage: each trial is one full r1ray training run."""
