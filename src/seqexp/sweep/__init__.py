"""Sweeps (`python scripts/train.py -m ...`): what each job does around `train()`, and the results.

job.py        one job: skip if finished, resume if interrupted, record a failure, write HParams
resources.py  CPU threads and GPU per parallel job
hparams.py    TensorBoard HParams with the job's real metrics, in the job's own run
summary.py    summary.md / summary.csv / plots for a sweep directory
callback.py   the Hydra callback that writes the summary when a multirun ends

The Optuna sweeper is a Hydra plugin: src/hydra_plugins/seqexp_optuna_sweeper/.
"""
