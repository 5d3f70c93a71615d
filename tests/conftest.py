import os

# Simulated CPU devices for the sharding tests; harmless for the rest (must precede jax import).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
