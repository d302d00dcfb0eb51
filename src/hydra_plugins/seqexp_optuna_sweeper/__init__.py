"""Optuna sweeper for Hydra (`hydra/sweeper=seqexp_optuna`), written for the current Optuna API.

Why not hydra-optuna-sweeper: its released versions (1.2.0, 1.3.0) require optuna<3 (2021-era,
with an SQLAlchemy 1.3 pin); Hydra's main branch has moved to optuna 4 but is unreleased. The
config keys are the same as that plugin's (direction, n_trials, n_jobs, sampler, storage,
study_name, params), so switching to it later is a one-line change of `hydra/sweeper`.
"""
