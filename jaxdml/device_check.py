"""`python -m jaxdml.device_check`: the one-command GPU/TPU report.

    python -m jaxdml.device_check --out=device_check [--quick]

The tool is `jaxdml.tools.device_check`; this module only runs it.
"""

from absl import app

from jaxdml.tools import device_check

if __name__ == "__main__":
  device_check.define_flags()
  app.run(device_check.main)
