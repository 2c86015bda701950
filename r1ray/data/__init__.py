"""The data stage: sources → clean → dedup → PII → decontaminate → tokenize → pack, on Ray Data."""
