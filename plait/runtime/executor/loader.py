"""Reading checkpoints from disk: Hugging Face ``config.json`` and ``*.safetensors`` weights.

Weights are streamed as ``(name, tensor)`` pairs straight from memory-mapped files; the model's own
per-parameter ``weight_loader`` decides where each one goes. A rank of a tensor-parallel group asks
for ``LazyTensor``s instead (``lazy=True``): the loader narrows one to its rows or columns and only
then reads it (safetensors' ``get_slice``), so no rank reads, or converts to the model's dtype, more
than its part of a split tensor. Weight loaders take either (``CheckpointTensor``), narrow first and
call ``materialized`` at the copy. torch and safetensors are imported lazily so that resolving a model
(``plait models list``) stays cheap.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from plait.runtime.models.errors import ModelLoadError, ModelNotFoundError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CheckpointTensor", "LazyTensor", "ModelLoadError", "iter_safetensors_weights", "load_config", "materialized",
    "read_json_object", "safetensors_files",
]

SAFETENSORS_INDEX = "model.safetensors.index.json"
# safetensors' dtype names -> torch's
_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
           "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
           "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu"}


def read_json_object(
    file: Path, error_type: type[Exception], max_bytes: int | None = None, what: str | None = None
) -> dict[str, Any]:
    """The JSON object in ``file``. A file larger than ``max_bytes``, unreadable, not JSON or not an
    object raises ``error_type`` naming it (``what``, e.g. "model config", goes before its path).
    The caller says what a missing file means (its error type and words differ)."""
    label = f"{what} {file}" if what else str(file)
    try:
        if max_bytes is not None and file.stat().st_size > max_bytes:
            raise error_type(f"{label} is larger than {max_bytes} bytes")
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error_type(f"cannot read {label}: {exc}") from exc
    if not isinstance(data, dict):
        raise error_type(f"{label} is not a JSON object")
    return data


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a Hugging Face config: ``path`` is a ``config.json`` file or a directory holding one.

    Raises ModelNotFoundError when the file is missing and ModelLoadError when it is not a JSON object.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        raise ModelNotFoundError(f"no model config at {file}")
    return read_json_object(file, ModelLoadError, what="model config")


def safetensors_files(weights_dir: str | os.PathLike[str]) -> list[Path]:
    """The ``*.safetensors`` files of a checkpoint directory, sorted.

    With a sharded checkpoint (``model.safetensors.index.json``) these are the shards its weight map
    names; a shard it names that is absent raises ModelNotFoundError. No weights at all raises too.
    """
    root = Path(weights_dir)
    index = root / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json_object(index, ModelLoadError, what="safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"cannot read safetensors index {index}: no 'weight_map' of tensor names to files")
        files = sorted({root / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelNotFoundError(f"{index} names shard(s) missing from {root}: {', '.join(missing)}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors weights in {root}")
    return files


def _read_errors() -> tuple[type[BaseException], ...]:
    """What safetensors raises for a corrupt or truncated file."""
    from safetensors import SafetensorError

    return (SafetensorError, OSError, RuntimeError, ValueError)


class LazyTensor:
    """A checkpoint tensor not read yet. ``narrow`` and ``transpose`` choose a region of it and ``to`` the
    dtype it is read into, as on a ``torch.Tensor``; ``materialize`` then reads that region's bytes alone
    (safetensors' ``get_slice``; the whole tensor through ``get_tensor``) and converts only them.
    A read error raises ModelLoadError naming the file and the tensor."""

    __slots__ = ("_handle", "_part", "name", "file", "_shape", "_stored_dtype", "_bounds", "_dims", "_cast")

    def __init__(self, handle: Any, name: str, file: Path):
        """``name`` of an open ``safe_open`` handle: its header read (shape, dtype), none of its data."""
        import torch

        self._handle, self.name, self.file = handle, name, file
        self._part = handle.get_slice(name)
        self._shape = tuple(self._part.get_shape())
        dtype = getattr(torch, _DTYPES.get(self._part.get_dtype(), ""), None)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype {self._part.get_dtype()} is not one plait reads")
        self._stored_dtype = dtype
        self._bounds = tuple((0, n) for n in self._shape)  # (start, stop) along each dim of the stored tensor
        self._dims = tuple(range(len(self._shape)))  # the stored dim that each dim of this view is
        self._cast: torch.dtype | None = None

    @property
    def shape(self) -> torch.Size:
        import torch

        return torch.Size(self._bounds[d][1] - self._bounds[d][0] for d in self._dims)

    @property
    def dtype(self) -> torch.dtype:
        return self._cast or self._stored_dtype

    def dim(self) -> int:
        return len(self._dims)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __repr__(self) -> str:
        return f"LazyTensor({self.name!r}, shape={tuple(self.shape)}, dtype={self.dtype})"

    def _with(self, **slots: Any) -> LazyTensor:
        view = object.__new__(LazyTensor)
        for slot in LazyTensor.__slots__:
            setattr(view, slot, slots.get(slot, getattr(self, slot)))
        return view

    def _dim(self, dim: int) -> int:
        if not -self.dim() <= dim < self.dim():
            raise IndexError(f"dimension {dim} out of range for {self!r}")
        return dim % self.dim()

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        """Elements ``start .. start + length`` along ``dim`` (nothing is read)."""
        stored = self._dims[self._dim(dim)]
        lo, hi = self._bounds[stored]
        if start < 0 or length < 0 or start + length > hi - lo:
            raise ValueError(f"{self!r}: cannot take {length} elements from {start} along dimension {dim}")
        bounds = list(self._bounds)
        bounds[stored] = (lo + start, lo + start + length)
        return self._with(_bounds=tuple(bounds))

    def transpose(self, dim0: int, dim1: int) -> LazyTensor:
        dims = list(self._dims)
        a, b = self._dim(dim0), self._dim(dim1)
        dims[a], dims[b] = dims[b], dims[a]
        return self._with(_dims=tuple(dims))

    def to(self, dtype: torch.dtype) -> LazyTensor:
        """Read into ``dtype`` (converted after the region is read, so only the region is)."""
        return self._with(_cast=dtype)

    def materialize(self) -> torch.Tensor:
        """Read this region (and nothing else) from the file."""
        try:
            if self._bounds == tuple((0, n) for n in self._shape):  # whole (a replicated parameter)
                tensor = self._handle.get_tensor(self.name)
            else:
                tensor = self._part[tuple(slice(lo, hi) for lo, hi in self._bounds)]
        except _read_errors() as exc:
            raise ModelLoadError(f"cannot read tensor {self.name!r} from safetensors file {self.file}: {exc}") from exc
        if self._dims != tuple(range(len(self._dims))):
            tensor = tensor.permute(self._dims)
        return tensor if self._cast is None else tensor.to(self._cast)


# what a parameter's ``weight_loader`` is handed: a tensor read whole, or a rank's LazyTensor
CheckpointTensor = Union["torch.Tensor", LazyTensor]


def materialized(loaded: CheckpointTensor) -> torch.Tensor:
    """``loaded`` as a tensor: itself, or a LazyTensor's region read now. Weight loaders call this once
    they have narrowed ``loaded`` to their part."""
    return loaded.materialize() if isinstance(loaded, LazyTensor) else loaded


def iter_safetensors_weights(
    weights_dir: str | os.PathLike[str], *, lazy: bool = False
) -> Iterator[tuple[str, CheckpointTensor]]:
    """Yield ``(name, tensor)`` for every tensor of every safetensors file in ``weights_dir``.

    Files are memory-mapped (``safetensors.safe_open``), so tensors are read only when consumed. With
    ``lazy`` (a rank of a tensor-parallel group) each is a ``LazyTensor``, read when its weight loader
    materializes the part it keeps. A corrupt or truncated file raises ModelLoadError naming the file
    (and the tensor, when one tensor cannot be read).
    """
    from safetensors import safe_open

    read_errors = _read_errors()
    for file in safetensors_files(weights_dir):
        try:
            handle = safe_open(str(file), framework="pt")
            names = list(handle.keys())
        except read_errors as exc:
            raise ModelLoadError(f"cannot read safetensors file {file}: {exc}") from exc
        for name in names:
            try:
                tensor = LazyTensor(handle, name, file) if lazy else handle.get_tensor(name)
            except (*read_errors, TypeError) as exc:  # TypeError: a dtype torch lacks (lazy)
                raise ModelLoadError(f"cannot read tensor {name!r} from safetensors file {file}: {exc}") from exc
            yield name, tensor
