"""Observability: the logger, the one list of Prometheus metric names, and the W&B wrapper."""
