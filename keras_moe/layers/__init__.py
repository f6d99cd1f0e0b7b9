"""Sparse MoE layers."""
