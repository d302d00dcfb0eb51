"""Datasets. Each exposes task, vocab_size, model_kwargs(), num_batches(), batches(), state()."""
