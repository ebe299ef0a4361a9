"""Two encoders for cross-domain retrieval (SBIR: sketch = query, photo = gallery).

The towers do not share weights; their variables sit under `params/query` and
`params/gallery` (and the same under `batch_stats`). Weights for one tower from
`load_torch_weights` go in as `variables["params"]["query"] = tower["params"]`.
"""
import flax.linen as nn


class TwoTower(nn.Module):
  """`__call__(query_images, gallery_images, train) -> ({"query": q, "gallery": g}, intermediates)`.

  `intermediates` is `{"query": ..., "gallery": ...}` with each tower's dict.
  `embed_query` / `embed_gallery` run one tower and return that tower's
  `(output, intermediates)`; use them for evaluation via
  `apply(variables, images, method="embed_query")`.
  """
  query: nn.Module
  gallery: nn.Module

  def __call__(self, query_images, gallery_images, train: bool = False):
    q, qi = self.query(query_images, train=train)
    g, gi = self.gallery(gallery_images, train=train)
    return {"query": q, "gallery": g}, {"query": qi, "gallery": gi}

  def embed_query(self, images, train: bool = False):
    return self.query(images, train=train)

  def embed_gallery(self, images, train: bool = False):
    return self.gallery(images, train=train)
