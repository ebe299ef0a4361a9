"""XBN on In-Shop Clothes Retrieval (query -> gallery protocol).

    python -m jaxdml.main --config=configs/inshop_xbn.py --workdir=workdirs/inshop_xbn
    python -m jaxdml.main --config=configs/inshop_xbn.py:adapt=none ...    # XBM

PAPERS.md section 2. Neither paper's In-Shop config is public to us: we use
XBM's SOP sample settings (see configs/sop_xbn.py) with the memory sized to
the In-Shop train split (25,882 images; XBM's memory holds about one data
set's worth of embeddings on SOP) and its 1,000-iteration warm start. XBM
reports R@1 91.3 on In-Shop.
"""

from jaxdml import recipes
from jaxdml.config import datasets


def get_config(arg=None):
  return recipes.xbn("inshop", arg, memory_size=datasets.CATALOGUE["inshop"].train_images)
