"""Training: the step, the one training loop (local and Ray Train), optimizer and weight average, checkpoints,
Ray Data ingest.
"""
