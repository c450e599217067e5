"""The Ray edge: config -> Ray Data pipelines, TorchTrainer runs, Tune sweeps."""
