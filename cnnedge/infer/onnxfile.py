"""What an .onnx file says about itself, read straight from its protobuf bytes: the `metadata_props` and the
graph's inputs and outputs (names, element types, shapes). Torch-free, onnx-free and onnxruntime-free.

    header = read_header(Path("export/cnn.onnx").read_bytes())
    header.props["class_names"], header.inputs["input"].shape   # '["0", ...]', [ 'batch', 1, 28, 28 ]

Why a reader of our own: OpenCV DNN runs the graph but reads neither the metadata nor the graph's signature,
and the boards `--runtime opencv` is for (32-bit ARM) have no onnxruntime and no onnx package to read them
with. The protobuf wire format is small and stable (https://protobuf.dev/programming-guides/encoding/):
a message is a run of (field number, wire type) keys, each followed by a varint, a fixed 4 or 8 bytes, or a
length and that many bytes. Only the fields below are decoded; everything else, weights included, is stepped
over by its length without being copied. The field numbers are onnx.proto's, unchanged since IR version 3.
Malformed bytes raise ValueError (the caller words the error).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# onnx.proto field numbers
MODEL_GRAPH, MODEL_METADATA_PROPS = 7, 14  # ModelProto
ENTRY_KEY, ENTRY_VALUE = 1, 2  # StringStringEntryProto
GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_SPARSE_INITIALIZER = 5, 11, 12, 15  # GraphProto
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14  # TensorProto
SPARSE_VALUES = 1  # SparseTensorProto.values (a TensorProto)
VALUE_NAME, VALUE_TYPE = 1, 2  # ValueInfoProto
TYPE_TENSOR = 1  # TypeProto.tensor_type
TENSOR_ELEM_TYPE, TENSOR_SHAPE = 1, 2  # TypeProto.Tensor
SHAPE_DIM = 1  # TensorShapeProto
DIM_VALUE, DIM_PARAM = 1, 2  # TensorShapeProto.Dimension
EXTERNAL = 1  # TensorProto.DataLocation

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5  # wire types
# TensorProto.DataType -> numpy's name for it (the ones a cnnedge graph input or output can have)
ELEM_TYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
              11: "float64", 16: "bfloat16"}


@dataclass
class ValueInfo:
    elem_type: str | None  # numpy's name ("float32"), None when the file does not say
    shape: list[int | str | None] | None  # ints, symbolic names, None for an unnamed unknown axis


@dataclass
class Header:
    props: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, ValueInfo] = field(default_factory=dict)  # initializers listed as inputs left out
    outputs: dict[str, ValueInfo] = field(default_factory=dict)
    external_data: list[str] = field(default_factory=list)  # initializers whose bytes live in another file


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


def fields(data: memoryview):
    """(field number, wire type, value) of each field of one message: an int for varints and fixed
    fields, a memoryview of the bytes for length-delimited ones."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == VARINT:
            value, pos = _varint(data, pos)
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            if pos + size > len(data):
                raise ValueError("truncated fixed-size field")
            value, pos = int.from_bytes(data[pos: pos + size], "little"), pos + size
        elif wire == LENGTH:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise ValueError(f"field {number} runs past the end of its message")
            value, pos = data[pos: pos + size], pos + size
        else:  # 3, 4: groups, which onnx.proto never uses; 6, 7: not wire types
            raise ValueError(f"wire type {wire}")
        yield number, wire, value


def _text(value) -> str:
    if not isinstance(value, memoryview):
        raise ValueError("a string field is not length-delimited")
    return bytes(value).decode("utf-8")  # UnicodeDecodeError is a ValueError


def _message(value) -> memoryview:
    if not isinstance(value, memoryview):
        raise ValueError("a message field is not length-delimited")
    return value


def _value_info(data: memoryview) -> tuple[str, ValueInfo]:
    name, elem_type, shape = "", None, None
    for number, _, value in fields(data):
        if number == VALUE_NAME:
            name = _text(value)
        elif number == VALUE_TYPE:
            for n, _, tensor in fields(_message(value)):
                if n != TYPE_TENSOR:
                    continue
                for m, _, v in fields(_message(tensor)):
                    if m == TENSOR_ELEM_TYPE:
                        elem_type = ELEM_TYPES.get(v, f"onnx type {v}")
                    elif m == TENSOR_SHAPE:
                        shape = []
                        for k, _, dim in fields(_message(v)):
                            if k != SHAPE_DIM:
                                continue
                            axis = None
                            for d, _, dv in fields(_message(dim)):
                                if d == DIM_VALUE:
                                    axis = dv - (1 << 64) if dv >= 1 << 63 else dv  # int64 in two's complement
                                elif d == DIM_PARAM:
                                    axis = _text(dv) or None
                            shape.append(axis)
    return name, ValueInfo(elem_type, shape)


def _tensor(data: memoryview) -> tuple[str, bool]:
    """(name, whether its bytes are in an external file) of a TensorProto."""
    name, external = "", False
    for number, _, value in fields(data):
        if number == TENSOR_NAME:
            name = _text(value)
        elif number == TENSOR_EXTERNAL_DATA or (number == TENSOR_DATA_LOCATION and value == EXTERNAL):
            external = True
    return name, external


def read_header(data: bytes | memoryview) -> Header:
    """Metadata, graph inputs and outputs of a serialized ModelProto; ValueError when it is not one."""
    data = memoryview(data)
    header = Header()
    graph = None
    for number, _, value in fields(data):
        if number == MODEL_METADATA_PROPS:
            entry = {ENTRY_KEY: "", ENTRY_VALUE: ""}
            for n, _, v in fields(_message(value)):
                if n in entry:
                    entry[n] = _text(v)
            header.props[entry[ENTRY_KEY]] = entry[ENTRY_VALUE]
        elif number == MODEL_GRAPH:
            graph = _message(value)
    if graph is None:
        raise ValueError("no graph")
    initializers, inputs = set(), []
    for number, _, value in fields(graph):
        if number == GRAPH_INPUT:
            inputs.append(_value_info(_message(value)))
        elif number == GRAPH_OUTPUT:
            name, info = _value_info(_message(value))
            header.outputs[name] = info
        elif number in (GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER):
            tensor = _message(value)
            if number == GRAPH_SPARSE_INITIALIZER:
                tensor = next((_message(v) for n, _, v in fields(tensor) if n == SPARSE_VALUES), memoryview(b""))
            name, external = _tensor(tensor)
            initializers.add(name)
            if external:
                header.external_data.append(name)
    header.inputs = {name: info for name, info in inputs if name not in initializers}
    return header
