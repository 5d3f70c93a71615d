import os

# Simulated CPU devices for the sharding tests; harmless for the rest (must precede jax import).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Several pytest-xdist workers share one GPU: each allocates as it goes instead of taking 75% of the
# memory up front, which would leave the others none.
if os.environ.get("PYTEST_XDIST_WORKER"):
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
