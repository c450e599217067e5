"""Training: optimizer and schedules, the per-step function, a local loop, generated batches.

Plain PyTorch; the Ray Train launcher (a later layer) calls :func:`loop.train_step`.
"""
