"""`python -m jaxdml.bench`: the throughput benchmark, as the design names it.

    python -m jaxdml.bench --config=configs/sketchy_rtl.py:demo [--batch_size=64,128]

The tool is `jaxdml.tools.bench`; this module only runs it.
"""

from jaxdml import commands
from jaxdml.tools import bench


def run():
  """The `jaxdml-bench` command."""
  bench.define_flags()
  commands.run(bench.main)


if __name__ == "__main__":
  run()
