"""Reading a TensorFlow frozen GraphDef (.pb) without TensorFlow.

The message classes are built at runtime from a minimal schema (the fields of TensorFlow's
graph.proto, node_def.proto, attr_value.proto, tensor.proto and tensor_shape.proto that a frozen
inference graph uses), so the only dependency is `protobuf`. Field numbers and types are
TensorFlow's; enums are declared as int32, which has the same wire format. Fields left out
(versions, function library, resource handles) are skipped by the parser as unknown fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from dfq.errors import DfqError

# TensorFlow's DataType enum values (types.proto) for the dtypes a frozen graph's constants use.
_DTYPES = {
    1: np.float32,
    2: np.float64,
    3: np.int32,
    4: np.uint8,
    5: np.int16,
    6: np.int8,
    9: np.int64,
    10: np.bool_,
    19: np.float16,
}
_DT_STRING = 7
# TensorProto's typed value fields, by numpy kind, for constants stored without tensor_content.
_VALUE_FIELDS = {
    np.float32: "float_val",
    np.float64: "double_val",
    np.int64: "int64_val",
    np.bool_: "bool_val",
    np.float16: "half_val",
}

# (message, [(field, number, type, label, type_name)]): a subset of TensorFlow's schema.
_OPT, _REP = 1, 3
_ATTR_VALUES = [
    ("s", 2, "bytes", _OPT, None),
    ("i", 3, "int64", _OPT, None),
    ("f", 4, "float", _OPT, None),
    ("b", 5, "bool", _OPT, None),
    ("type", 6, "int32", _OPT, None),
    ("shape", 7, "message", _OPT, "TensorShapeProto"),
    ("tensor", 8, "message", _OPT, "TensorProto"),
]
_SCHEMA = (
    ("Dim", [("size", 1, "int64", _OPT, None), ("name", 2, "string", _OPT, None)]),
    (
        "TensorShapeProto",
        [("dim", 2, "message", _REP, "Dim"), ("unknown_rank", 3, "bool", _OPT, None)],
    ),
    (
        "TensorProto",
        [
            ("dtype", 1, "int32", _OPT, None),
            ("tensor_shape", 2, "message", _OPT, "TensorShapeProto"),
            ("tensor_content", 4, "bytes", _OPT, None),
            ("float_val", 5, "float", _REP, None),
            ("double_val", 6, "double", _REP, None),
            ("int_val", 7, "int32", _REP, None),
            ("string_val", 8, "bytes", _REP, None),
            ("int64_val", 10, "int64", _REP, None),
            ("bool_val", 11, "bool", _REP, None),
            ("half_val", 13, "int32", _REP, None),
        ],
    ),
    # ListValue repeats AttrValue's value fields s..tensor (2-8), each one repeated
    ("ListValue", [(name, n, t, _REP, tn) for name, n, t, _, tn in _ATTR_VALUES]),
    (
        "AttrValue",
        [
            ("list", 1, "message", _OPT, "ListValue"),
            *_ATTR_VALUES,
            ("placeholder", 9, "string", _OPT, None),
        ],
    ),
    ("AttrEntry", [("key", 1, "string", _OPT, None), ("value", 2, "message", _OPT, "AttrValue")]),
    (
        "NodeDef",
        [
            ("name", 1, "string", _OPT, None),
            ("op", 2, "string", _OPT, None),
            ("input", 3, "string", _REP, None),
            ("device", 4, "string", _OPT, None),
            ("attr", 5, "message", _REP, "AttrEntry"),
        ],
    ),
    ("GraphDef", [("node", 1, "message", _REP, "NodeDef")]),
)
_ONEOF = {"AttrValue": "value"}  # AttrValue's fields are one `oneof`: WhichOneof says which is set


@lru_cache(maxsize=1)
def _graphdef_class():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(
        name="dfq_tf_graph.proto", package="dfq_tf", syntax="proto3"
    )
    for name, fields in _SCHEMA:
        msg = fdp.message_type.add(name=name)
        if name in _ONEOF:
            msg.oneof_decl.add(name=_ONEOF[name])
        if name == "AttrEntry":
            msg.options.map_entry = True  # NodeDef.attr is map<string, AttrValue>
        for fname, number, ftype, label, type_name in fields:
            f = msg.field.add(
                name=fname,
                number=number,
                label=label,
                type=getattr(descriptor_pb2.FieldDescriptorProto, f"TYPE_{ftype.upper()}"),
            )
            if type_name:
                f.type_name = f".dfq_tf.{type_name}"
            if name in _ONEOF:
                f.oneof_index = 0
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("dfq_tf.GraphDef"))


@dataclass
class TFNode:
    """One NodeDef: `attrs` holds plain Python values; a Const's value is `tensor` (numpy)."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict = field(default_factory=dict)
    tensor: np.ndarray | None = None


def tensor_to_numpy(t) -> np.ndarray:
    """A TensorProto as a numpy array (raw `tensor_content`, or typed values filled as TF does)."""
    shape = tuple(d.size for d in t.tensor_shape.dim)
    if t.dtype == _DT_STRING:  # e.g. assertion messages: kept as bytes objects
        return np.array([bytes(v) for v in t.string_val], dtype=object).reshape(shape or (-1,))
    if t.dtype not in _DTYPES:
        raise DfqError(f"TensorFlow dtype {t.dtype} is not supported by dfq's GraphDef reader.")
    dtype = np.dtype(_DTYPES[t.dtype])
    if t.tensor_content:
        return np.frombuffer(t.tensor_content, dtype=dtype).reshape(shape).copy()
    name = _VALUE_FIELDS.get(dtype.type, "int_val")
    values = np.asarray(getattr(t, name), dtype=np.uint16 if name == "half_val" else None)
    values = values.view(np.float16) if name == "half_val" else values.astype(dtype)
    if values.size == 0:
        return np.zeros(shape, dtype)
    # TF repeats the last value to fill the shape (constants of one repeated value are stored once)
    n = int(np.prod(shape))
    return np.concatenate([values, np.repeat(values[-1:], n - values.size)]).reshape(shape)


def _attr_value(a):
    kind = a.WhichOneof("value")
    if kind == "tensor":
        return tensor_to_numpy(a.tensor)
    if kind == "shape":
        return tuple(d.size for d in a.shape.dim)
    if kind == "list":
        lst = a.list
        return (
            [bytes(v) for v in lst.s]
            or list(lst.i)
            or list(lst.f)
            or list(lst.b)
            or list(lst.type)
            or []
        )
    return getattr(a, kind) if kind else None


def read_graphdef(path: str | Path) -> list[TFNode]:
    """The nodes of a frozen GraphDef in file order; DfqError if it is missing or not a GraphDef."""
    path = Path(path)
    if not path.is_file():
        raise DfqError(
            f"frozen graph {path} does not exist.",
            "check `weights` (a TensorFlow frozen_inference_graph.pb)",
        )
    from dfq.utils.deps import require

    DecodeError = require(
        "google.protobuf.message", "reading a TensorFlow frozen graph (.pb)"
    ).DecodeError
    graph = _graphdef_class()()

    try:
        graph.ParseFromString(path.read_bytes())
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise DfqError(
            f"{path} is corrupt or not a TensorFlow GraphDef ({type(exc).__name__}).",
            "re-download it, or export a frozen inference graph",
        ) from exc
    if not graph.node:
        raise DfqError(
            f"{path} holds no graph nodes.", "pass a TensorFlow frozen inference graph (.pb)"
        )
    nodes = []
    for n in graph.node:
        attrs = {k: _attr_value(v) for k, v in n.attr.items()}
        tensor = attrs.pop("value", None) if n.op == "Const" else None
        nodes.append(TFNode(n.name, n.op, list(n.input), attrs, tensor))
    return nodes
