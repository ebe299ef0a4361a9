"""`python -m jaxdml.bench`: the throughput benchmark, as the design names it.

    python -m jaxdml.bench --config=configs/sketchy_rtl.py:demo [--batch_size=64,128]

The tool is `jaxdml.tools.bench`; this module only runs it.
"""

from absl import app

from jaxdml import config as config_lib
from jaxdml.tools import bench


def run():
  """The `jaxdml-bench` command."""
  bench.define_flags()
  app.run(bench.main, flags_parser=lambda argv: app.parse_flags_with_usage(
      config_lib.expand_recipe_flags(argv)))


if __name__ == "__main__":
  run()
