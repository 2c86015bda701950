"""r1ray: a raw text corpus to a served R1-style reasoning model on one Ray cluster."""

__version__ = "0.1.0"
