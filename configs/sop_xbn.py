"""Adaptive Cross Batch Normalization (XBN) on Stanford Online Products.

Ajanthan et al. 2023 (arXiv 2303.17127), PAPERS.md section 2: a FIFO memory
of past embeddings whose moments are matched to the current batch before the
contrastive loss pairs the batch with it.

    python -m jaxdml.main --config=configs/sop_xbn.py --workdir=workdirs/sop_xbn
    python -m jaxdml.main --config=configs/sop_xbn.py:adapt=none ...    # XBM
    python -m jaxdml.main --config=configs/sop_xbn.py:adapt=kalman ...  # revised XBN
    python -m jaxdml.main --config=configs/sop_xbn.py:demo ...          # embedded data
    python -m jaxdml.main --config=configs/sop_xbn.py:backbone=dinov2_vit_s14 ...  # another encoder

The XBN paper's code and exact settings are not public: everything below is
XBM's published SOP sample config (msight-tech/research-xbm), which XBN builds
on: ResNet-50, linear 128-d head + L2, contrastive loss on cosine similarity
(positives 1 - s, negatives s where s > 0.5), Adam lr 1e-4, weight decay
5e-4, batch 64 with 4 images per class, memory 55,000 used from iteration
1,000, 35,000 iterations. XBM reports R@1 80.6 on SOP; XBN reports gains
over XBM at every batch and memory size.
"""

from jaxdml import recipes


def get_config(arg=None):
  return recipes.xbn("sop", arg, memory_size=55_000)
