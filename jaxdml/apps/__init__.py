"""Apps built on a trained run: SavedModel export (`export`), a model as
embed functions (`embedder`), and the image index (`image_index`) with its
commands `python -m jaxdml.apps.index_images` and `python -m
jaxdml.apps.search_images`."""
