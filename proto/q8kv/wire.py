"""Tensors on the wire: raw little-endian row-major bytes + dtype + shape (as KServe v2).

numpy <-> Tensor messages, with the dtype, shape, finiteness and magnitude checks. Part of
the contract (proto/q8kv), shared by the client and the server so both sides agree byte
for byte; it imports nothing of q8kv but q8kv.v1. Decoding never copies: the array is a
read-only view of the message's bytes.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from q8kv.v1 import kvcache_pb2 as pb

NUMPY_DTYPES: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
}
WIRE_DTYPES: dict[np.dtype, int] = {v: k for k, v in NUMPY_DTYPES.items()}
MAX_RANK = 64  # numpy's limit
DTYPE_NAMES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "bfloat16": pb.BFLOAT16}


class TensorError(ValueError):
    """A tensor message that cannot be decoded; the message names the field."""


def wire_dtype(dtype: np.dtype | str | int) -> int:
    """A numpy dtype, a name ('float16') or a pb.DType value -> the pb.DType value."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    try:
        return WIRE_DTYPES[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise TensorError(f"dtype: expected float32, float16 or bfloat16, got {dtype}") from None


def encode(array: np.ndarray, dtype: np.dtype | str | int | None = None) -> pb.Tensor:
    """numpy array -> Tensor message, cast to ``dtype`` if given (default: the array's)."""
    tensor = pb.Tensor()
    fill(tensor, array, dtype)
    return tensor


def fill(tensor: pb.Tensor, array: np.ndarray, dtype: np.dtype | str | int | None = None) -> None:
    """``encode`` into a Tensor field of a message being built (``msg.output``): passing
    an encoded Tensor to a message's constructor copies its bytes once more (upb), tens of
    milliseconds for a prefill's tensors."""
    code, data = _wire_array(array, dtype)
    tensor.dtype = code
    tensor.shape[:] = data.shape
    tensor.data = data.tobytes()


def _wire_array(array, dtype) -> tuple[int, np.ndarray]:
    """The wire dtype (``dtype``, default the array's) and the array's values in it,
    C-contiguous (no copy when they already are)."""
    array = np.asarray(array)
    code = wire_dtype(array.dtype if dtype is None else dtype)
    return code, np.ascontiguousarray(array, dtype=NUMPY_DTYPES[code])


# Pieces of a serialized message, to be joined once (b"".join): the large ones are views.
Parts = list[bytes | memoryview]


def tensor_parts(array: np.ndarray, dtype: np.dtype | str | int | None = None) -> Parts:
    """``encode(array, dtype).SerializeToString()`` as parts to join, the data a view of the
    array's bytes, not a copy: joined into a larger message they are copied once, where
    ``fill`` and serializing copy the data three times (tobytes, the message, its bytes).
    The bytes are those protobuf writes (fields in number order)."""
    code, data = _wire_array(array, dtype)
    head = pb.Tensor(dtype=code, shape=data.shape).SerializeToString()
    if not data.nbytes:
        return [head]
    raw = memoryview(data.reshape(-1).view(np.uint8))
    return [head, *length_delimited(3, [raw])]  # Tensor.data is field 3


def length_delimited(number: int, parts: Parts) -> Parts:
    """A field ``number`` of wire type 2 (a message, bytes) whose payload is ``parts``
    joined: its key and length, then the parts."""
    size = sum(part.nbytes if isinstance(part, memoryview) else len(part) for part in parts)
    return [_varint(number << 3 | 2) + _varint(size), *parts]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode(tensor: pb.Tensor, field: str = "tensor") -> np.ndarray:
    """Tensor message -> read-only numpy view of its bytes; TensorError names ``field``."""
    dtype = NUMPY_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise TensorError(
            f"{field}.dtype: expected FLOAT32, FLOAT16 or BFLOAT16, got "
            f"{pb.DType.Name(tensor.dtype) if tensor.dtype in pb.DType.values() else tensor.dtype}"
        )
    shape = tuple(tensor.shape)
    if shape and min(shape) < 0:
        raise TensorError(f"{field}.shape: expected non-negative dimensions, got {list(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    data = tensor.data  # each read of a bytes field copies it (upb): read it once
    if len(data) != expected:
        raise TensorError(
            f"{field}.data: expected {expected} bytes for shape {list(shape)} of "
            f"{pb.DType.Name(tensor.dtype)}, got {len(data)}"
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError:  # zero elements, but a dimension or a rank numpy cannot hold
        raise TensorError(
            f"{field}.shape: expected at most {MAX_RANK} dimensions whose product of nonzero "
            f"ones fits in memory, got {list(shape)}"
        ) from None


# Per wire dtype: the unsigned and signed views, the mask that clears the sign bit, and the
# bits of +Inf. Without the sign, IEEE floats order like their bits, and NaN's bits lie above
# +Inf's.
_MAGNITUDE_BITS = {
    np.dtype("<f4"): (np.uint32, np.int32, 0x7FFFFFFF, 0x7F800000),
    np.dtype("<f2"): (np.uint16, np.int16, 0x7FFF, 0x7C00),
    np.dtype(ml_dtypes.bfloat16): (np.uint16, np.int16, 0x7FFF, 0x7F80),
}


def largest_magnitude(array: np.ndarray) -> float:
    """max |x| over the array (0.0 if empty), NaN if any element is NaN, read from the bits:
    the finiteness and the magnitude checks of a tensor at once.

    Two reductions and no temporary (1.4x faster than masking the sign off every element):
    the unsigned maximum is the negative of largest magnitude when there is a negative, else
    the largest positive; the signed maximum is the largest positive when there is one."""
    if array.size == 0:
        return 0.0
    unsigned, signed, mask, inf = _MAGNITUDE_BITS[array.dtype]
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    # The ufunc's reduce, not np.max or .max: their Python wrappers cost more than a small
    # tensor's pass.
    top = max(
        int(np.maximum.reduce(array.view(unsigned), axis=None)) & mask,
        int(np.maximum.reduce(array.view(signed), axis=None)),
    )
    if top > inf:
        return float("nan")
    return float(np.array(top, unsigned).view(array.dtype))
