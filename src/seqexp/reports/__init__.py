"""Reports: what a run shows around its evaluations (base.py states the contract; one module per report)."""
