"""Training one run: the loop, the step, the mesh, checkpoints, metrics, restoring a run."""
