"""Verifiable reasoning tasks (procedural, seeded, download-free) and rule-based rewards."""
