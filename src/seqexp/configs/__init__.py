"""The config groups, shipped inside the package so that an installed seqexp finds them (pkg://seqexp.configs)."""
