"""Orchestration above the library stages: one config from corpus to served model, and the one place
that prepares a missing upstream stage."""
