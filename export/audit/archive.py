"""A ``.keras`` zip and a Keras ``.h5`` file, checked before anything extracts or reads them.

``audit_zip`` reads only the end-of-central-directory record (the entry count, before
``zipfile`` builds an object per entry) and then the central directory; nothing is
decompressed, so it takes milliseconds whatever the archive claims. It refuses too many
entries; an entry whose declared size is over its cap (``config.json`` 4 MB: a 5.8 MB
archive whose config inflates to 1.5 GB took 3.7 GB of memory) or whose compression ratio is
over ``MAX_RATIO``; a total over ``MAX_TOTAL_BYTES`` (a 7 MB archive that extracts 3 GB into
``$TMPDIR``); unsafe names (absolute, ``..``, backslash, drive, NUL, duplicates); links and
device entries; encryption; methods other than stored and deflate; overlapping entries.
``read_member`` reads one entry with a hard cap that does not trust the declared size.

``audit_h5`` walks an HDF5 file's metadata with h5py without reading a dataset: hard links
only (soft and external links read other files), no virtual or external datasets, every
dataset's declared bytes capped (a gzip-filtered dataset can be a bomb), and the root
``model_config`` attribute at most ``MAX_CONFIG_BYTES``. tf_keras stores that attribute as a
variable-length string whose length HDF5 does not tell without reading it; attributes are
never compressed, so the file size minus the datasets' stored bytes bounds it: over the cap,
the file is refused unread.
"""
from __future__ import annotations

import os
import stat
import struct
import zipfile

from probattn.models.errors import UsageError

#: what Keras writes into a .keras archive (plus assets/)
KERAS_NAMES = {"config.json", "metadata.json", "model.weights.h5", "model.weights.npz"}
#: a classifier's config is a few KB; 4 MB is a thousand times that
MAX_CONFIG_BYTES = 4 << 20
NAME_CAPS = {"config.json": MAX_CONFIG_BYTES, "metadata.json": 64 << 10}
MAX_ENTRIES = 64
#: one entry at most (the weights of a 500 M-parameter fp32 model)
MAX_ENTRY_BYTES = 2 << 30
MAX_TOTAL_BYTES = 4 << 30
MAX_FILE_BYTES = 4 << 30
#: deflate reaches about 1000x only on degenerate data; real weights compress < 2x, JSON < 20x
MAX_RATIO = 200.0
#: entries smaller than this are not ratio-checked (a small JSON may compress 100x)
RATIO_MIN_BYTES = 1 << 20
MAX_H5_OBJECTS = 10_000
MAX_H5_ATTR_BYTES = 64 << 20


def _regular(path, what):
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{what} {path} is not a regular file (a link, FIFO, device or directory)")
    if st.st_size > MAX_FILE_BYTES:
        raise UsageError(f"{what} {path} is {st.st_size:,} bytes; at most {MAX_FILE_BYTES:,} allowed")
    return st


def _eocd_entries(path):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        tail_len = min(size, 65536 + 22)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        i = tail.rfind(b"PK\x05\x06")
        if i < 0:
            raise UsageError(f"{path} is not a valid .keras file (not a zip archive; truncated or not a Keras model)")
        (count,) = struct.unpack("<H", tail[i + 10:i + 12])
        if count == 0xFFFF:  # zip64: the locator sits just before the record
            loc = tail[i - 20:i] if i >= 20 else b""
            if loc[:4] != b"PK\x06\x07":
                raise UsageError(f"{path}: zip64 archive without a zip64 locator")
            (off,) = struct.unpack("<Q", loc[8:16])
            if off + 56 > size:
                raise UsageError(f"{path}: zip64 record points past the end of the file")
            f.seek(off)
            rec = f.read(56)
            if rec[:4] != b"PK\x06\x06":
                raise UsageError(f"{path}: bad zip64 end-of-central-directory record")
            (count,) = struct.unpack("<Q", rec[32:40])
    if count > MAX_ENTRIES:
        raise UsageError(f"{path} declares {count:,} archive entries; at most {MAX_ENTRIES} allowed")
    return count


def _check_name(path, name):
    if not name or "\0" in name or "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UsageError(f"{path}: archive entry name {name!r} is not allowed (absolute, drive, backslash or NUL)")
    if any(p in ("", ".", "..") for p in name.rstrip("/").split("/")):
        raise UsageError(f"{path}: archive entry name {name!r} is not allowed ('.', '..' or an empty component)")


def audit_zip(path, what: str = "model file") -> list:
    """``[(name, declared size)]`` of a .keras archive, or a UsageError."""
    path = os.fspath(path)
    _regular(path, what)
    _eocd_entries(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise UsageError(f"{path} is not a valid .keras file ({e})") from None
    out, total, seen, spans = [], 0, set(), []
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ENTRIES:
            raise UsageError(f"{path} holds {len(infos)} archive entries; at most {MAX_ENTRIES} allowed")
        for info in infos:
            name = info.filename
            _check_name(path, name)
            if name.lower() in seen:
                raise UsageError(f"{path}: archive entry {name!r} appears twice")
            seen.add(name.lower())
            mode = info.external_attr >> 16
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # Keras writes no type bits
                raise UsageError(f"{path}: archive entry {name!r} is a symbolic link or special file")
            if info.flag_bits & 0x1:
                raise UsageError(f"{path}: archive entry {name!r} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise UsageError(f"{path}: archive entry {name!r} uses compression method {info.compress_type}; "
                                 "only stored and deflate are allowed")
            if not info.is_dir():
                if name not in KERAS_NAMES and not name.startswith("assets/"):
                    raise UsageError(f"{path}: archive entry {name!r} is not part of a .keras file; allowed: "
                                     f"{', '.join(sorted(KERAS_NAMES))}, assets/")
                cap = NAME_CAPS.get(name, MAX_ENTRY_BYTES)
                if info.file_size > cap:
                    raise UsageError(f"{path}: archive entry {name} inflates to {info.file_size:,} bytes; at most "
                                     f"{cap:,} allowed")
                ratio = info.file_size / max(info.compress_size, 1)
                if info.file_size > RATIO_MIN_BYTES and ratio > MAX_RATIO:
                    raise UsageError(f"{path}: archive entry {name} inflates {ratio:,.0f}x ({info.compress_size:,} -> "
                                     f"{info.file_size:,} bytes); at most {MAX_RATIO:.0f}x allowed")
                total += info.file_size
                if total > MAX_TOTAL_BYTES:
                    raise UsageError(f"{path} inflates to more than {MAX_TOTAL_BYTES:,} bytes in all")
            header = 30 + len(info.orig_filename.encode("utf-8", "surrogateescape"))
            spans.append((info.header_offset, info.header_offset + header + info.compress_size, name))
            out.append((name, info.file_size))
    spans.sort()
    for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:]):
        if b_start < a_end:
            raise UsageError(f"{path}: archive entries {a!r} and {b!r} overlap (an overlapping-entries zip bomb)")
    return out


def read_member(zf: zipfile.ZipFile, name: str, cap: int) -> bytes:
    """One entry, never more than ``cap`` bytes whatever the archive declares."""
    chunks, total = [], 0
    with zf.open(name) as f:
        while True:
            chunk = f.read(min(1 << 20, cap + 1 - total))
            if not chunk:
                break
            total += len(chunk)
            if total > cap:
                raise UsageError(f"archive entry {name} is larger than {cap:,} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


def audit_h5(path, what: str = "model file") -> dict:
    """Walk an HDF5 file's metadata (no dataset read); ``{"config_bytes", "total_bytes"}``."""
    import h5py
    import numpy as np

    path = os.fspath(path)
    st = _regular(path, what)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UsageError(f"{path} could not be read as an HDF5 Keras model ({' '.join(str(e).split())[:120]})") from None
    with f:
        count = [0]

        def links(g, prefix=""):
            for k in g.keys():
                count[0] += 1
                if count[0] > MAX_H5_OBJECTS:
                    raise UsageError(f"{path} holds more than {MAX_H5_OBJECTS:,} HDF5 objects")
                link = g.get(k, getlink=True)
                if not isinstance(link, h5py.HardLink):
                    raise UsageError(f"{path}: HDF5 link /{prefix}{k} is a {type(link).__name__}; only hard links "
                                     "are allowed (others read other files)")
                obj = g.get(k)
                if isinstance(obj, h5py.Group):
                    links(obj, f"{prefix}{k}/")

        links(f)
        total, stored, objs = [0], [0], [f]

        def visit(name, obj):
            objs.append(obj)
            if isinstance(obj, h5py.Dataset):
                if obj.is_virtual or obj.external:
                    raise UsageError(f"{path}: HDF5 dataset /{name} is virtual or external (it reads other files)")
                n = int(np.prod(obj.shape, dtype=np.float64)) if obj.shape else 1
                nbytes = n * obj.dtype.itemsize
                if nbytes > MAX_ENTRY_BYTES:
                    raise UsageError(f"{path}: HDF5 dataset /{name} declares {list(obj.shape)} {obj.dtype} = "
                                     f"{nbytes:,} bytes; at most {MAX_ENTRY_BYTES:,} allowed")
                total[0] += nbytes
                if total[0] > MAX_TOTAL_BYTES:
                    raise UsageError(f"{path}: HDF5 datasets add up to more than {MAX_TOTAL_BYTES:,} bytes")
                stored[0] += obj.id.get_storage_size()

        f.visititems(visit)
        bound = max(st.st_size - stored[0], 0)
        config_bytes = 0
        for obj in objs:
            for name in obj.attrs.keys():
                aid = h5py.h5a.open(obj.id, name.encode())
                try:
                    dt, shape = aid.dtype, aid.shape or ()
                    n = int(np.prod(shape)) if shape else 1
                    sdt = h5py.check_string_dtype(dt)
                    vlen = dt.kind == "O" or (sdt is not None and sdt.length is None)
                    size = bound if vlen else n * dt.itemsize
                finally:
                    aid.close()
                is_config = obj is f and name in ("model_config", "training_config")
                cap = MAX_CONFIG_BYTES if is_config else MAX_H5_ATTR_BYTES
                if size > cap:
                    raise UsageError(f"{path}: HDF5 attribute {obj.name}:{name} {'may hold up to' if vlen else 'is'} "
                                     f"{size:,} bytes; at most {cap:,} allowed")
                if is_config and name == "model_config":
                    config_bytes = size
    return {"config_bytes": config_bytes, "total_bytes": total[0]}
