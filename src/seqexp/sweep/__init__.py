"""Sweeps (`python scripts/train.py -m ...`): what each job does around `train()`, and the results.

job.py        one job: skip if finished, resume if interrupted, record a failure or an interrupt, write HParams
resources.py  CPU threads and GPU per parallel job
hparams.py    TensorBoard HParams with the job's real metrics, in the job's own run
summary.py    summary.md / summary.csv / plots for a sweep directory
callback.py   the Hydra callback: listens for stop signals; the summary and exit code at the end

The Optuna sweeper is a Hydra plugin: src/hydra_plugins/seqexp_optuna_sweeper/.
"""
