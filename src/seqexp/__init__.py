"""seqexp: train and compare sequence models (RNN, LSTM/GRU, attention) from Hydra configs."""

from importlib.metadata import PackageNotFoundError, version

try:  # one version, pyproject.toml's, as installed
    __version__ = version("seqexp")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "unknown"
