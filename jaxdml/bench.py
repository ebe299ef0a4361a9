"""`python -m jaxdml.bench`: the throughput benchmark, as the design names it.

    python -m jaxdml.bench --config=configs/sketchy_rtl.py:demo [--batch_size=64,128]

The tool is `jaxdml.tools.bench`; this module only runs it.
"""

from absl import app

from jaxdml.tools import bench

if __name__ == "__main__":
  bench.define_flags()
  app.run(bench.main)
