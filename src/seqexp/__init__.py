"""seqexp: train and compare sequence models (RNN, LSTM/GRU, attention) from Hydra configs."""

__version__ = "0.1.0"
