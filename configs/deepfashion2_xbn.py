"""XBN on DeepFashion2 consumer-to-shop retrieval (query -> gallery).

    python -m jaxdml.main --config=configs/deepfashion2_xbn.py --workdir=workdirs/df2_xbn

PAPERS.md section 2. The XBN paper evaluates on DeepFashion2 but its settings
are not public to us: XBM's SOP sample settings (configs/sop_xbn.py), with
ScaNN search for the large shop gallery and a 55,000-slot memory as on SOP
(the retrieval train split is larger than the memory: it keeps the most
recent 55,000 embeddings).
"""

from jaxdml import recipes


def get_config(arg=None):
  return recipes.xbn("deepfashion2", arg, memory_size=55_000)
