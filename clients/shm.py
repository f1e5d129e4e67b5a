"""System shared memory for large payloads, when the client and the server share a host.

Instead of sending tensors in the request body, the client writes them into a POSIX shared-memory
segment (`/dev/shm/<key>`) that the server has registered, and the server writes the outputs back
into the same segment; the request then carries only names and offsets.

Regions are pooled: a call takes a free region that is large enough (or creates and registers a
new one, sized to the next power of two), lays its inputs and fixed-size outputs out in it, and
gives it back afterwards, so registration costs one round trip per region, not per call. The
client unregisters and removes every region on `close()`; a region a failed call may have left in
an unknown state is discarded at once; and a finalizer removes the segments of a client that was
never closed, so nothing is left in /dev/shm.

Why not `tritonclient.utils.shared_memory`: in tritonclient 2.51 that module imports
`pkg_resources` to find its C library, and setuptools >= 81 no longer ships `pkg_resources` (so
it fails to import in kiln's environment); a segment is `shm_open` + `ftruncate` + `mmap`, which
the standard library does directly (Triton opens the same `/dev/shm/<key>`).
"""

from __future__ import annotations

import mmap
import os
import threading
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tritonclient.utils import serialize_byte_tensor

from kiln.clients.models import BYTES, ModelInfo, numpy_dtype, triton_dtype

SHM_DIR = Path("/dev/shm")
"""Where Linux keeps POSIX shared-memory segments (what shm_open uses)."""
REGION_PREFIX = "kiln_client_"
"""Every region this SDK creates is named (and keyed) with this prefix."""
MIN_REGION_BYTES = 64 * 1024
ALIGNMENT = 64
"""Byte alignment of each tensor inside a region."""


def _align(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _region_size(needed: int) -> int:
    size = MIN_REGION_BYTES
    while size < needed:
        size *= 2
    return size


def available() -> bool:
    """Whether this machine has POSIX shared memory at /dev/shm."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


class Region:
    """One shared-memory segment: created and mapped here, registered with the server by name.

    Attributes:
        name: The name the server knows it by.
        key: The shm key ("/" + the file name in /dev/shm).
        byte_size: Its size in bytes.
        registered: Whether the server has it registered (the client keeps this up to date).
    """

    def __init__(self, byte_size: int) -> None:
        self.name = f"{REGION_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}"
        self.key = "/" + self.name
        self.byte_size = byte_size
        self.registered = False
        path = SHM_DIR / self.name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, byte_size)
            self._map = mmap.mmap(fd, byte_size)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self.path = path

    def write(self, offset: int, data: np.ndarray) -> None:
        """Copies a contiguous numeric array (or serialized bytes) into the region at `offset`."""
        view = np.ndarray(data.shape, data.dtype, buffer=self._map, offset=offset)
        view[...] = data

    def read(self, offset: int, datatype: str, shape: Sequence[int]) -> np.ndarray:
        """A copy of the numeric tensor at `offset` (the region is reused after the call)."""
        dtype = numpy_dtype(datatype)
        return np.ndarray(tuple(shape), dtype, buffer=self._map, offset=offset).copy()

    def destroy(self) -> None:
        """Unmaps the region and removes its segment (it must be unregistered first)."""
        try:
            self._map.close()
        finally:
            self.path.unlink(missing_ok=True)


def _unlink_all(paths: set[Path]) -> None:
    """Finalizer: removes segments a client never got to clean up (process exit, GC)."""
    for path in list(paths):
        path.unlink(missing_ok=True)
        paths.discard(path)


@dataclass(frozen=True)
class Placement:
    """Where one tensor lives in a region.

    Attributes:
        name: The tensor's name.
        offset: Its offset in the region, in bytes.
        byte_size: Its size in bytes.
        data: For an input, the bytes to write (numeric array, or the serialized BYTES tensor).
    """

    name: str
    offset: int
    byte_size: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class Layout:
    """One call's tensors inside one region.

    Attributes:
        inputs: Where each input goes (with its data).
        outputs: Where each output the server writes goes (fixed-size numeric outputs only;
            the others come back in the response).
        byte_size: The bytes the call needs.
    """

    inputs: tuple[Placement, ...]
    outputs: tuple[Placement, ...]
    byte_size: int


def plan_layout(
    info: ModelInfo, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], batch: int
) -> Layout:
    """Lays out a call's inputs and fixed-size outputs, each aligned, in one region.

    Args:
        info: The model (gives the output sizes).
        inputs: Input name -> array, as sent.
        outputs: The outputs requested.
        batch: The call's batch size (outputs scale with it).
    """
    offset = 0
    placed_inputs = []
    for name, array in inputs.items():
        if triton_dtype(array.dtype) == BYTES:
            data = serialize_byte_tensor(array)
            data = np.frombuffer(data.item() if data.size else b"", dtype=np.uint8)
        else:
            data = np.ascontiguousarray(array)
        placed_inputs.append(Placement(name, offset, int(data.nbytes), data))
        offset = _align(offset + data.nbytes)
    placed_outputs = []
    for name in outputs:
        item_bytes = info.output(name).item_byte_size(info.batches)
        if item_bytes is None:
            continue
        size = item_bytes * (batch if info.batches else 1)
        placed_outputs.append(Placement(name, offset, size))
        offset = _align(offset + size)
    return Layout(tuple(placed_inputs), tuple(placed_outputs), max(offset, 1))


class RegionPool:
    """Regions a client reuses across calls; thread-safe.

    `take()` hands out a free region of at least the size asked for (or None: create one with
    `create()`, register it, then use it); `give_back()` returns it after a call, `discard()`
    forgets one a failed call used (the client unregisters and destroys it, or `retire()`s it when
    the server still uses it); `drain()` returns every region so the client can unregister and
    destroy them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[Region] = []
        self._all: list[Region] = []
        self._retired: list[Region] = []
        self._paths: set[Path] = set()
        self._finalizer = weakref.finalize(self, _unlink_all, self._paths)

    def take(self, byte_size: int) -> Region | None:
        """A free registered region of at least `byte_size` bytes, the smallest such, or None."""
        with self._lock:
            fitting = [r for r in self._free if r.byte_size >= byte_size and r.registered]
            if not fitting:
                return None
            region = min(fitting, key=lambda r: r.byte_size)
            self._free.remove(region)
            return region

    def create(self, byte_size: int) -> Region:
        """A new region (not yet registered) for at least `byte_size` bytes, owned by the pool."""
        region = Region(_region_size(byte_size))
        with self._lock:
            self._all.append(region)
            self._paths.add(region.path)
        return region

    def give_back(self, region: Region) -> None:
        """Returns a region after a call, for the next one."""
        with self._lock:
            if region in self._all:
                self._free.append(region)

    def discard(self, region: Region) -> Region:
        """Forgets a region (the caller unregisters and destroys it); returns it."""
        with self._lock:
            if region in self._free:
                self._free.remove(region)
            if region in self._all:
                self._all.remove(region)
            self._paths.discard(region.path)
        return region

    def retire(self, region: Region) -> None:
        """Parks a region the server would not unregister yet (a timed-out request may still be
        writing to it); `take_retired()` hands it back for another try."""
        with self._lock:
            self._retired.append(region)
            self._paths.add(region.path)

    def take_retired(self) -> list[Region]:
        """The retired regions (forgotten by the pool: the caller unregisters or retires them)."""
        with self._lock:
            regions, self._retired = self._retired, []
            for region in regions:
                self._paths.discard(region.path)
        return regions

    def drain(self) -> list[Region]:
        """Forgets every pooled region and returns them (for the client to unregister and destroy);
        retired ones stay for `take_retired()`."""
        with self._lock:
            regions, self._all, self._free = self._all, [], []
            for region in regions:
                self._paths.discard(region.path)
        return regions

    def __len__(self) -> int:
        with self._lock:
            return len(self._all)
