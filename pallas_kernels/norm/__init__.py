"""RMSNorm kernels of the residual stream (GPU)."""
