"""The memory policy of a training step: keep, recompute, offload or chunk."""
