"""jaxdml command line: embed a folder of images into an index to search.

    python -m jaxdml.apps.index_images --workdir=workdirs/demo --images=photos/ --out=photos.index
    python -m jaxdml.apps.index_images --export=workdirs/demo/export --images=photos/ --out=photos.index
    python -m jaxdml.apps.index_images --workdir=workdirs/demo --write_demo_images=demo_images

The model is a trained run (`--workdir`, its latest checkpoint; its config
from the `config.json` training wrote, or `--config`) or its export
(`--export`, a `--mode=export` SavedModel). Every .jpg, .jpeg and .png under
`--images` is decoded, given evaluation's transform (shorter side to
S * 8/7, centre crop), embedded in batches and saved with its file name
(`jaxdml/apps/image_index.py` describes the index). A file that does not
load (not an image, cut short, over --max_megapixels) is left out, named in
the output and in the index's manifest; `--strict` makes it an error. `--write_demo_images=DIR`
instead writes the run's evaluation images (for the demo: its test photos
and sketches) to DIR, something to index and search.
Then: python -m jaxdml.apps.search_images --index=photos.index QUERY_IMAGE...
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined when it runs, so that importing this
  module, for its documentation, defines none)."""
  config_flags.DEFINE_config_file(
      "config", None, "The run's recipe, when its workdir has no config.json (runs trained "
      "before jaxdml wrote one); overrides it otherwise.", lock_config=True)
  flags.DEFINE_string("workdir", None, "A trained run: its latest checkpoint embeds.")
  flags.DEFINE_string("export", None,
                      "A --mode=export SavedModel directory, instead of --workdir.")
  flags.DEFINE_string("images", None,
                      "Folder of images (.jpg, .jpeg, .png, searched recursively).")
  flags.DEFINE_string("out", None, "Index directory to write (local or a URL).")
  flags.DEFINE_enum("tower", "gallery", ["gallery", "query"],
                    "Which tower embeds the images (SBIR: gallery = photos, query = sketches).")
  flags.DEFINE_integer("batch_size", 256, "Images per embedding batch.")
  flags.DEFINE_enum("backend", "auto", ["auto", "exact", "scann"],
                    "Search structure: auto = exact below 20,000 images, a ScaNN index above.")
  flags.DEFINE_enum("similarity", "cosine", ["cosine", "dot", "euclidean"],
                    "How results are scored (cosine: 1 for the same image).")
  flags.DEFINE_string("cpu_devices", "auto", "JAX devices to split a CPU into, as in jaxdml.main.")
  flags.DEFINE_string("write_demo_images", None,
                      "Write the run's evaluation images as PNG files to this folder and exit.")
  flags.DEFINE_bool("strict", False, "Fail when an image file does not load, instead of "
                    "leaving it out of the index (listed in its manifest).")
  flags.DEFINE_float("max_megapixels", 179, "Images with more pixels are refused (PIL's "
                     "decompression bomb guard).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  # Imported here so that `--help` answers without starting JAX.
  from jaxdml import paths, sharding  # pylint: disable=g-import-not-at-top
  from jaxdml import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from jaxdml.apps import embedder, image_index  # pylint: disable=g-import-not-at-top
  if FLAGS.write_demo_images:
    if not (FLAGS.config or FLAGS.workdir):
      raise app.UsageError("--write_demo_images needs the run's data: pass --workdir or --config.")
    config = FLAGS.config or workdir_lib.load_config(FLAGS.workdir)
    written = image_index.write_eval_images(config, FLAGS.write_demo_images)
    print(f"Wrote {len(written)} images to {FLAGS.write_demo_images}.")
    return
  if bool(FLAGS.workdir) == bool(FLAGS.export):
    raise app.UsageError("Pass the model as exactly one of --workdir (a trained run) and "
                         "--export (its --mode=export directory).")
  if not (FLAGS.images and FLAGS.out):
    raise app.UsageError("Pass --images=FOLDER (the images to index) and --out=INDEX.")
  paths.check_reachable(FLAGS.workdir or FLAGS.export, "--workdir" if FLAGS.workdir else "--export")
  paths.check_reachable(FLAGS.out, "--out")
  embedder.set_pixel_limit(FLAGS.max_megapixels)
  if FLAGS.workdir:
    sharding.use_cpu_cores_as_devices(FLAGS.cpu_devices, FLAGS.batch_size)
    model = embedder.from_workdir(FLAGS.workdir, FLAGS.config, batch_size=FLAGS.batch_size)
  else:
    model = embedder.from_export(FLAGS.export, batch_size=FLAGS.batch_size)
  index = image_index.build_index(model, FLAGS.images, FLAGS.out, tower=FLAGS.tower,
                                  batch_size=FLAGS.batch_size, backend=FLAGS.backend,
                                  similarity=FLAGS.similarity, strict=FLAGS.strict)
  manifest = index.manifest
  print(f"Indexed {manifest['count']} images of {index.folder} ({manifest['dim']}-d, "
        f"{manifest['tower']} tower of {model.describe()}, {manifest['backend']} search) "
        f"in {index.path}.")
  skipped = manifest["skipped"]
  if skipped:
    print(f"Left out {len(skipped)} files that do not load (all listed under \"skipped\" in "
          f"{index.path}/manifest.json; --strict makes this an error):")
    for why in list(skipped.values())[:10]:
      print(f"  {why}")
    if len(skipped) > 10:
      print(f"  ... and {len(skipped) - 10} more.")


def run():
  """The `jaxdml-index` command (`jaxdml.commands.run`: user errors in one line)."""
  from jaxdml import commands  # pylint: disable=g-import-not-at-top
  define_flags()
  commands.run(main)


if __name__ == "__main__":
  run()
