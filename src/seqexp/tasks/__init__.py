"""Tasks: how a dataset's examples are scored (base.py states the contract; one module per task)."""
