"""Hydra plugins that serve seqexp's signature schemas (seqexp/schema.py) as `/schema/<target>`."""
