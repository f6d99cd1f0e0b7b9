"""Checkpoint readers: each source format into a keras_moe model."""
