"""Test set-up: 8 fake CPU devices, so sharded code runs as on a pod slice.

XLA reads the flag once, when the backend starts, so it is set here, before
anything imports jax. Tests that want one device build a one-device mesh.

Many tests compile the same smoke models (init, step, embed); JAX's
persistent compilation cache lets the later ones reuse the first compile,
which divides their time by about four. Results do not change: the cache is
keyed by the compiled program.
"""
import os
import sys

# The checkout's benchmark programs (benchmarks/) are importable by tests;
# they are not part of the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The tests compile hundreds of small programs and run each a few steps:
# most of a compile is LLVM optimising the CPU code, which these runs never
# win back (the fast suite took 530 s instead of 760 on 2 cores). XLA's
# own passes still run; only the machine code is less optimised.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                 ".pytest_cache", "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
