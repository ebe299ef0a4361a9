"""`tf.train.Example` records parsed without TensorFlow.

TFDS stores each record as a serialized `tf.train.Example`. TensorFlow's own
`example_pb2` is the obvious parser, but importing it imports TensorFlow:
~470 MB of memory and ~3 s in every worker process that only needs a
record's image bytes. The message is declared here instead, field for field
as tensorflow/core/example/{example,feature}.proto declare it, in a private
descriptor pool (no clash with TensorFlow's when both are loaded), and
parsed by protobuf's C implementation, as `example_pb2` would be.
"""
import functools

from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
import numpy as np

_LABEL = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "jaxdml.tf_example"  # not "tensorflow": a separate pool, a separate name


def _message(container, name, *fields, map_entry=False):
  """Adds message `name` with `fields` (name, type, label, message type),
  numbered 1, 2, ... as in the .proto files, to `container` (a file's
  `message_type` or a message's `nested_type`)."""
  msg = container.add(name=name)
  if map_entry:
    msg.options.map_entry = True
  for number, (field_name, kind, label, type_name) in enumerate(fields, 1):
    field = msg.field.add(name=field_name, number=number, label=label, type=kind)
    if type_name:
      field.type_name = f".{_PACKAGE}.{type_name}"
  return msg


@functools.cache
def example_class():
  """The `tf.train.Example` message class (a `Feature` holds one of a
  `BytesList`, `FloatList` or `Int64List`; `Features.feature` maps names to
  `Feature`s)."""
  file = descriptor_pb2.FileDescriptorProto(name="jaxdml_tf_example.proto", package=_PACKAGE,
                                            syntax="proto3")
  rep, opt = _LABEL.LABEL_REPEATED, _LABEL.LABEL_OPTIONAL
  top = file.message_type
  _message(top, "BytesList", ("value", _LABEL.TYPE_BYTES, rep, None))
  _message(top, "FloatList", ("value", _LABEL.TYPE_FLOAT, rep, None))
  _message(top, "Int64List", ("value", _LABEL.TYPE_INT64, rep, None))
  feature = _message(top, "Feature", ("bytes_list", _LABEL.TYPE_MESSAGE, opt, "BytesList"),
                     ("float_list", _LABEL.TYPE_MESSAGE, opt, "FloatList"),
                     ("int64_list", _LABEL.TYPE_MESSAGE, opt, "Int64List"))
  feature.oneof_decl.add(name="kind")
  for field in feature.field:
    field.oneof_index = 0
  features = _message(top, "Features",
                      ("feature", _LABEL.TYPE_MESSAGE, rep, "Features.FeatureEntry"))
  _message(features.nested_type, "FeatureEntry", ("key", _LABEL.TYPE_STRING, opt, None),
           ("value", _LABEL.TYPE_MESSAGE, opt, "Feature"), map_entry=True)
  _message(top, "Example", ("features", _LABEL.TYPE_MESSAGE, opt, "Features"))
  pool = descriptor_pool.DescriptorPool()
  pool.Add(file)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Example"))


def feature_bytes(record: bytes, name: str) -> bytes:
  """The first value of bytes feature `name` of a serialized Example."""
  example = example_class().FromString(record)
  if name not in example.features.feature:
    raise KeyError(f"the record has no feature {name!r}; it has "
                   f"{sorted(example.features.feature)}.")
  return example.features.feature[name].bytes_list.value[0]


def int64_scalars(records, names) -> dict:
  """`{name: int64 [N]}`: integer feature `name` (one value per record) of
  every serialized Example in `records` (a sequence of N of them)."""
  parse = example_class().FromString
  out = {name: np.empty(len(records), np.int64) for name in names}
  for i in range(len(records)):
    feature = parse(records[i]).features.feature
    for name, values in out.items():
      if name not in feature or len(feature[name].int64_list.value) != 1:
        raise ValueError(f"record {i} does not hold one integer {name!r} (features: "
                         f"{sorted(feature)}); the data set's files do not match its "
                         "features.json: prepare it again.")
      values[i] = feature[name].int64_list.value[0]
  return out
