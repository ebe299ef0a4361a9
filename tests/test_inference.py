"""One restore path: a run's model for eval, export and the image index.

Distilled students (SBIR KD, RAML) are the hard case: their teacher is
another run. Once trained they must not need it: each is evaluated,
exported and indexed here after its teacher's workdir is deleted.
"""

import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from jaxdml import checkpoint, inference, train
from jaxdml import workdir as workdir_lib
from jaxdml.apps import embedder, export, image_index
from test_train import evaluation, final_params, load_config, train_teacher_of


def saved_state_params(workdir):
  """The params of the run's latest checkpoint, restored the training way."""
  return final_params(workdir, workdir_lib.load_config(workdir))


@pytest.fixture(scope="module")
def sbir_student(tmp_path_factory):
  """A 2-step SBIR KD student of a 1-step teacher whose workdir is then gone."""
  tmp = tmp_path_factory.mktemp("sbir_kd")
  config = load_config("sketchy_rtl_kd.py")
  train_teacher_of(config, str(tmp / "teacher"))
  config.total_steps = 2
  evaluation(config, False)
  train.train_and_evaluate(config, str(tmp / "student"))
  shutil.rmtree(tmp / "teacher")
  return config, str(tmp / "student")


def test_a_distilled_student_evaluates_without_its_teacher(sbir_student):
  config, workdir = sbir_student
  evaluation(config, True)
  results = train.evaluate_checkpoint(config, workdir)
  assert 0 <= results["recall@1"] <= 1 and "category/recall@1" in results


def test_a_distilled_student_exports_and_indexes_without_its_teacher(sbir_student, tmp_path):
  _, workdir = sbir_student
  path = export.export_saved_model(workdir_lib.load_config(workdir), workdir,
                                   platforms=("cpu",))
  assert os.path.exists(os.path.join(path, export.MANIFEST))
  folder = tmp_path / "photos"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(folder / f"{i}.png")
  model = embedder.from_workdir(workdir, batch_size=8)  # its config.json, no --config
  index = image_index.build_index(model, str(folder), str(tmp_path / "index"), progress=False)
  assert index.manifest["count"] == 3 and index.manifest["model"]["step"] == 2


def test_restore_reads_the_model_alone_and_records_the_teachers_architecture(sbir_student):
  """No optimizer or teacher object is built: the model's entries of the
  checkpoint are read, and the teacher's architecture is in its metadata."""
  _, workdir = sbir_student
  model = inference.restore(workdir)
  assert set(model.variables) == {"params", "batch_stats"} and model.step == 2
  saved = train.setup(workdir_lib.load_config(workdir), workdir)[1]
  meta = saved.meta()
  saved.close()
  assert meta["teacher_model"]["name"] == "two_tower"  # the teacher's ResNet pair
  saved_params = saved_state_params(workdir)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(model.variables["params"]),
               saved_params)
  with pytest.raises(FileNotFoundError, match="No checkpoint in .*--mode=train"):
    inference.restore(os.path.dirname(workdir), workdir_lib.load_config(workdir))


def test_raml_student_evaluates_asymmetrically_without_its_teacher(tmp_path):
  """RAML's asymmetric evaluation embeds the database with the teacher
  tower: its architecture and weights come from the student's checkpoint."""
  config = load_config("cub_raml.py")
  train_teacher_of(config, str(tmp_path / "teacher"))
  config.total_steps = 1
  evaluation(config, False)
  train.train_and_evaluate(config, str(tmp_path / "student"))
  shutil.rmtree(tmp_path / "teacher")
  evaluation(config, True)
  results = train.evaluate_checkpoint(config, str(tmp_path / "student"))
  assert "recall@1" in results and "asym/recall@1" in results
  # The teacher tower is the teacher's own network, not the student's.
  model = inference.restore(str(tmp_path / "student"), teacher=True)
  student = jax.tree.structure(model.variables["params"])
  teacher = jax.tree.structure(model.teacher_variables["params"])
  assert model.towers.image_sizes["teacher"] == 2 * model.towers.image_sizes["query"]
  assert student == teacher  # same architecture here, at twice the resolution
  ckpt = checkpoint.Checkpointer(str(tmp_path / "student"), read_only=True)
  assert ckpt.meta()["teacher_model"]["name"] == config.model.name
  ckpt.close()
