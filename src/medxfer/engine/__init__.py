"""Training engine: the loop (AMP, DDP, early stop), inference and cached features."""
