"""The config groups, shipped inside the package so that an installed seqexp finds them (pkg://seqexp.configs)."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent  # package data: installed with seqexp
