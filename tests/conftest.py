"""Test set-up: 8 fake CPU devices, so sharded code runs as on a pod slice.

XLA reads the flag once, when the backend starts, so it is set here, before
anything imports jax. Tests that want one device build a one-device mesh.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
