"""Clustering quality of embeddings: NMI and AMI of k-means clusters.

As pytorch-metric-learning's AccuracyCalculator: the query embeddings as
given are clustered into as many clusters as they have labels, and the
clusters are scored against the labels with scikit-learn's
`normalized_mutual_info_score` and `adjusted_mutual_info_score` (equal to
its scores of the same clusters). The k-means differs: ours is
scikit-learn's `KMeans` (k-means++ initialisation, Lloyd iterations,
`n_init` restarts, `seed`), PML's faiss's (one random start, 20
iterations), which on some draws merges two clusters that ours separates.
Both give 1 for perfect clusters and about 0 for shuffled labels
(`tests/test_accuracy_calculator.py`); other values agree only where both
find the same partition.

k-means costs O(N x clusters x dim) per iteration: fine for CUB or Cars,
minutes for SOP's 11k classes, which is why `evaluate` computes these only
when asked (`metrics=(..., "nmi", "ami")`).
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from jaxdml import extras


def cluster_scores(embeddings: ArrayLike, labels: ArrayLike, *, seed: int = 0,
                   n_init: int = 3) -> dict:
  """`{"nmi": ..., "ami": ...}` of k-means on `embeddings` [N, D] against int
  `labels` [N]; `seed` fixes the k-means (`evaluate`'s `kmeans_seed`)."""
  cluster = extras.require("sklearn.cluster", "NMI and AMI (k-means)")
  metrics = extras.require("sklearn.metrics", "NMI and AMI (k-means)")
  x = np.asarray(embeddings, np.float64)
  labels = np.asarray(labels)
  num_clusters = len(np.unique(labels))
  if num_clusters < 2 or num_clusters > len(x):
    raise ValueError(f"NMI/AMI need 2 to {len(x)} label values; got {num_clusters}.")
  clusters = cluster.KMeans(n_clusters=num_clusters, n_init=n_init,
                            random_state=seed).fit_predict(x)
  return {"nmi": float(metrics.normalized_mutual_info_score(labels, clusters)),
          "ami": float(metrics.adjusted_mutual_info_score(labels, clusters))}
