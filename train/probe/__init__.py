"""Probing one trained run: evaluation, passkey, sparsity budget, reach, generation."""
