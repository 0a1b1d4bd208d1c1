"""numpy <-> ``deeprx.v1.Tensor``, shared by client and service.

Decoding checks what a peer can get wrong (dtype, shape, byte count, non-finite values) and
raises :class:`TensorError` naming the field, which the server turns into INVALID_ARGUMENT.
"""
from __future__ import annotations

import math

import numpy as np

from proto import receiver_pb2 as pb

_DTYPES = {pb.Tensor.FLOAT32: np.dtype("<f4"), pb.Tensor.UINT8: np.dtype("u1")}
_CODES = {np.dtype("<f4"): pb.Tensor.FLOAT32, np.dtype("u1"): pb.Tensor.UINT8}


class TensorError(ValueError):
    """A tensor field that cannot be decoded; the message starts with the field name."""


def encode(array: np.ndarray) -> pb.Tensor:
    """A float32 or uint8 array as a Tensor (little-endian, C order)."""
    array = np.asarray(array)
    dtype = np.dtype("<f4") if array.dtype.kind == "f" else np.dtype("u1")
    if array.dtype.kind not in "fub":
        raise TypeError(f"cannot encode dtype {array.dtype}: use float32 or uint8")
    return pb.Tensor(dtype=_CODES[dtype], shape=list(array.shape),
                     data=np.ascontiguousarray(array, dtype=dtype).tobytes())


def encode_complex(array: np.ndarray) -> pb.Tensor:
    """A complex array as FLOAT32 with a trailing (re, im) axis of 2."""
    array = np.asarray(array)
    return encode(np.stack([array.real, array.imag], axis=-1).astype(np.float32))


def decode(tensor: pb.Tensor, field: str, dtype: int, ndim: int, max_elements: int) -> np.ndarray:
    """Check and decode ``tensor``; ``field`` names it in errors."""
    if dtype not in _DTYPES:
        raise TensorError(f"{field}: unsupported dtype")
    if tensor.dtype != dtype:
        got = pb.Tensor.DType.Name(tensor.dtype) if tensor.dtype in pb.Tensor.DType.values() else tensor.dtype
        raise TensorError(f"{field}: dtype must be {pb.Tensor.DType.Name(dtype)}, got {got}")
    shape = tuple(tensor.shape)
    if len(shape) != ndim:
        raise TensorError(f"{field}: expected {ndim} dimensions, got shape {list(shape)}")
    if min(shape) <= 0:
        raise TensorError(f"{field}: empty or negative dimension in shape {list(shape)}")
    count = math.prod(shape)  # Python ints: np.prod would cost a third of a slot's decode
    if count > max_elements:
        raise TensorError(f"{field}: {count} elements exceed the limit of {max_elements}")
    np_dtype = _DTYPES[dtype]
    if len(tensor.data) != count * np_dtype.itemsize:
        raise TensorError(f"{field}: {len(tensor.data)} bytes do not match shape {list(shape)} "
                          f"of {np_dtype.name} ({count * np_dtype.itemsize} bytes)")
    array = np.frombuffer(tensor.data, dtype=np_dtype).reshape(shape)
    if np_dtype.kind == "f" and not np.isfinite(array).all():
        raise TensorError(f"{field}: contains NaN or Inf")
    return array


def decode_complex(tensor: pb.Tensor, field: str, ndim: int, max_elements: int) -> np.ndarray:
    """Decode a FLOAT32 tensor with a trailing (re, im) axis into complex64 of ``ndim`` dims."""
    array = decode(tensor, field, pb.Tensor.FLOAT32, ndim + 1, max_elements)
    if array.shape[-1] != 2:
        raise TensorError(f"{field}: last dimension must be 2 (re, im), got {array.shape[-1]}")
    return array.view(np.complex64)[..., 0].copy()  # (re, im) float32 pairs are complex64 in memory
