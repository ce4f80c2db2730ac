"""Shared test data."""

TINY = {
    "name": "tiny",
    "seed": 3,
    "device": "cpu",
    "model": {"name": "mlp", "hidden": [32]},
    "data": {"name": "digits"},
    "pretrain": {"epochs": 2, "optimizer": "adam", "lr": 0.01, "batch_size": 64},
    "quant": {"method": "lsq", "bits": 4},
    "train": {"epochs": 2, "optimizer": "adam", "lr": 0.002, "batch_size": 64},
}
"""A small experiment on the embedded digits that trains in seconds (test_cli, test_runs)."""
