"""jaxdml command line: search an image index (`jaxdml.apps.index_images`) with query images.

    python -m jaxdml.apps.search_images --index=photos.index sketch.png [more.png ...] \\
        [-k 10] [--picture=neighbours.png] [--json]

Prints each query's neighbours: rank, score (cosine: 1 for the same image)
and the file's path in the indexed folder; `--json` prints one JSON object
instead. `--picture` draws the queries and their results, the grid of
training's `retrieval_STEP.png` with neutral frames (no labels here).

The queries are embedded by the model the index was made with (its workdir
or export), with the query tower (SBIR: the sketch encoder); `--workdir` or
`--export` names another copy of it, and a model whose embeddings differ
from the index's is refused.

A query that does not load (missing, not an image, over --max_megapixels)
is named on stderr and the others are answered; the exit status is then 1.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined when it runs, so that importing this
  module, for its documentation, defines none)."""
  config_flags.DEFINE_config_file(
      "config", None, "With --workdir: the run's recipe, when the workdir has no config.json.",
      lock_config=True)
  flags.DEFINE_string("index", None,
                      "Index directory written by python -m jaxdml.apps.index_images.")
  flags.DEFINE_integer("k", 10, "Neighbours per query.")
  flags.DEFINE_string("picture", None, "Write a PNG of the queries and their neighbours here.")
  flags.DEFINE_enum("tower", "query", ["query", "gallery"],
                    "Which tower embeds the queries (SBIR: query = sketches, gallery = photos).")
  flags.DEFINE_string("workdir", None, "Query model: this run instead of the index's model.")
  flags.DEFINE_string("export", None, "Query model: this export instead of the index's model.")
  flags.DEFINE_bool("json", False, "Print the results as one JSON object.")
  flags.DEFINE_integer("batch_size", 256, "Images per embedding batch.")
  flags.DEFINE_string("cpu_devices", "auto", "JAX devices to split a CPU into, as in jaxdml.main.")
  flags.DEFINE_float("max_megapixels", 179, "Query images with more pixels are refused (PIL's "
                     "decompression bomb guard).")
  flags.mark_flags_as_required(["index"])



def main(argv):
  queries = argv[1:]
  if not queries:
    raise app.UsageError("Name one or more query images: python -m jaxdml.apps.search_images "
                         "--index=INDEX QUERY_IMAGE...")
  if FLAGS.workdir and FLAGS.export:
    raise app.UsageError("Pass at most one of --workdir and --export.")
  if FLAGS.k < 1:
    raise app.UsageError(f"-k={FLAGS.k}: ask for at least one neighbour.")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  # Imported here so that `--help` answers without starting JAX.
  import json  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxdml import config as config_lib, sharding  # pylint: disable=g-import-not-at-top
  from jaxdml.apps import embedder, image_index  # pylint: disable=g-import-not-at-top
  index = image_index.load_index(FLAGS.index)
  source = index.manifest["model"]
  config = None
  if FLAGS.workdir or FLAGS.export:
    source = {"workdir": FLAGS.workdir} if FLAGS.workdir else {"export": FLAGS.export}
    config = FLAGS.config
  elif "workdir" in source:  # the config the index was made with
    config = config_lib.upgrade_saved(ml_collections.ConfigDict(index.manifest["config"]))
  if "workdir" in source:
    sharding.use_cpu_cores_as_devices(FLAGS.cpu_devices, FLAGS.batch_size)
  embedder.set_pixel_limit(FLAGS.max_megapixels)
  model = embedder.from_source(source, config, batch_size=FLAGS.batch_size)
  images, errors = load_queries(queries, model.image_size)
  answered = [q for q in queries if q not in errors]
  results = []
  if answered:
    scores, rows = image_index.search_index(index, model, images, k=FLAGS.k, tower=FLAGS.tower)
    results = [{"query": query, "neighbours": [
        {"rank": r + 1, "score": float(s), "file": index.files[i], "path": index.path_of(i)}
        for r, (s, i) in enumerate(zip(score_row, row))]}
               for query, score_row, row in zip(answered, scores, rows)]
    if FLAGS.picture:
      draw(FLAGS.picture, index, images, rows)
  if FLAGS.json:
    print(json.dumps({"index": index.path, "model": model.describe(), "results": results,
                      "errors": [{"query": q, "error": e} for q, e in errors.items()],
                      "picture": FLAGS.picture if answered else None}, indent=1))
  else:
    for result in results:
      print(result["query"])
      for n in result["neighbours"]:
        print(f"  {n['rank']:3d}  {n['score']:+.4f}  {n['file']}")
    if FLAGS.picture and answered:
      print(f"Picture written to {FLAGS.picture}")
  for error in errors.values():
    print(f"jaxdml: {error}", file=sys.stderr)
  if errors:  # answered what could be, and says that not all were
    sys.exit(1)


def load_queries(queries, size):
  """`(uint8 images of the queries that load, {query: why} of those that do not)`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxdml.apps import embedder  # pylint: disable=g-import-not-at-top
  images, errors = [], {}
  for query in queries:
    try:
      images.append(embedder.load_image(query, size))
    except ValueError as error:  # missing, not an image, over the pixel limit
      errors[query] = str(error)
  return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), errors


def draw(path, index, query_images, rows) -> None:
  """The retrieval grid of the queries and their neighbours' images."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxdml.apps import embedder  # pylint: disable=g-import-not-at-top
  from jaxdml.retrieval import picture  # pylint: disable=g-import-not-at-top
  shown, position = np.unique(rows, return_inverse=True)  # each neighbour loaded once
  try:
    gallery = embedder.load_images([index.path_of(i) for i in shown],
                                   index.manifest["image_size"])
  except (FileNotFoundError, ValueError) as error:
    raise FileNotFoundError(f"--picture needs the indexed images, read from {index.folder}: "
                            f"{error}. Leave out --picture, or put the folder back.") from None
  picture.save_retrieval_grid(path, query_images, gallery, position.reshape(rows.shape), None,
                              max_queries=len(query_images))


def run():
  """The `jaxdml-search` command (`jaxdml.commands.run`: user errors in one line)."""
  from jaxdml import commands  # pylint: disable=g-import-not-at-top
  define_flags()
  commands.run(main)


if __name__ == "__main__":
  run()
