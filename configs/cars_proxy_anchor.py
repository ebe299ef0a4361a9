"""Proxy-Anchor on CARS: ResNet-50 (avg + max pooling), 512-d, proxies at 100x the lr.

Kim et al., CVPR 2020; settings and differences in jaxdml/recipes/proxy_anchor.py.

    python -m jaxdml.main --config=configs/cars_proxy_anchor.py \\
        --config.model.init_file=resnet50_imagenet.safetensors --workdir=workdirs/cars_proxy_anchor

Arguments: `smoke`, `demo`, `seed=N`.
"""

from jaxdml import recipes


def get_config(arg=None):
  return recipes.proxy_anchor("cars196", arg)
