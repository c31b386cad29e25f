"""ONNX Runtime's prepacked weights, written once and mapped by every session of a process.

ONNX Runtime repacks each constant weight of MatMulNBits, QMoE and Gemm into the layout its
CPU kernels (MLAS) read, at session creation, on the heap and once per session: prefill,
decode and score each hold their own packed copy of the same experts (docs/benchmarks.md:
that, not the weight file, is most of a serving process's memory). ONNX Runtime can save an
optimized model with its packed weights in an external data file
(`session.save_external_prepacked_constant_initializers`) and maps such a file when it loads
the model. `load` does that once per program and merges every program's data into one file,
`pack.data`, each distinct blob stored once (by content): the sessions of a process map the
same pages, so physical memory (PSS) holds one packed copy however many programs run, and
the kernel can drop and re-read those clean pages under pressure, which it cannot do with
heap.

The packed layout depends on the CPU's instruction set and on the ONNX Runtime build, so the
files are made on the device, on first use, under the bundle's state folder (user only: a
grown version's weights come from the user's text), in a folder named by a hash of the ONNX
Runtime version, the CPU's features and the weight file served (each program's graph named
by a hash of its file); a folder for another key (an older weights version) is removed when
a new one is made, under a lock that serializes the processes writing them. Anything that
goes wrong here (a read-only bundle, a full disk, an ONNX Runtime without the option, a
graph it cannot load back) costs only the sharing: the caller gets None and builds the
session as before, and that program is not tried again for these weights; a pack cut short
is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

import numpy as np
from moegrow.device_kernels.manifest import ONNX_DATA

from . import experts

PACK, INDEX = "pack.data", "index.json"
ALIGN = 4096  # blobs of a page or more start on a page: the kernels read them in place
EXTERNAL = 1  # TensorProto.DataLocation: the tensor's bytes are in a file


def _stamp(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


@functools.cache
def _cpu() -> str:
    """The machine and its CPU's feature flags (x86 "flags", Arm "Features")."""
    flags = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.split(":")[0].strip() in
                      ("flags", "Features")), "")
    return platform.machine() + " " + flags


def key(ort_version: str, weights: Path) -> str:
    """The cache folder's name: what the packed bytes depend on, but the program."""
    parts = [ort_version, _cpu(), _stamp(weights)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


@contextlib.contextmanager
def _locked(folder: Path):
    fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _whole(folder: Path) -> bool:
    """Whether the pack holds every byte its index lists."""
    try:
        size = json.loads((folder / INDEX).read_text())["size"]
        return (folder / PACK).stat().st_size >= size
    except (OSError, ValueError, KeyError):
        return False


@functools.cache
def _model_class():
    """A protobuf message class that reads an ONNX model as far as its graph's initializers'
    external data (ModelProto.graph, GraphProto.initializer, TensorProto.external_data and
    data_location, the same field numbers) and keeps every other field as it came, byte for
    byte: what `_merge` rewrites, without the onnx package, whose import holds 15 MB of
    this process's memory for the rest of its life (docs/benchmarks.md)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="moegrow/onnx_initializers.proto",
                                               package="moegrow_onnx")
    for message, fields in (
            ("Entry", [("key", 1, field.TYPE_STRING, 0), ("value", 2, field.TYPE_STRING, 0)]),
            ("Tensor", [("external_data", 13, ".moegrow_onnx.Entry", 1),
                        ("data_location", 14, field.TYPE_INT32, 0)]),
            ("Graph", [("initializer", 5, ".moegrow_onnx.Tensor", 1)]),
            ("Model", [("graph", 7, ".moegrow_onnx.Graph", 0)])):
        m = proto.message_type.add(name=message)
        for name, number, kind, repeated in fields:
            f = m.field.add(name=name, number=number, label=(
                field.LABEL_REPEATED if repeated else field.LABEL_OPTIONAL))
            if isinstance(kind, str):
                f.type, f.type_name = field.TYPE_MESSAGE, kind
            else:
                f.type = kind
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("moegrow_onnx.Model"))


def _merge(model_path: Path, folder: Path, name: str) -> None:
    """Move the optimized model at `model_path` (and its data file) into `folder`: its blobs
    appended to the pack unless already there, its references rewritten to point at them."""
    model = _model_class().FromString(model_path.read_bytes())
    index_path, pack_path = folder / INDEX, folder / PACK
    index = {"size": 0, "blobs": {}}
    if _whole(folder):
        index = json.loads(index_path.read_text())
    blobs, sources = index["blobs"], {}
    fd = os.open(pack_path, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+b") as pack, contextlib.ExitStack() as files:
        pack.truncate(index["size"])  # bytes past the index: a merge that did not finish
        pack.seek(index["size"])

        def put(location: str, offset: int, length: int) -> int:
            if location not in sources:  # read, not mapped: a map's pages would count in
                # the process's resident memory while it merges (26 MB of the default
                # int4 model's `idle` peak, docs/benchmarks.md)
                sources[location] = files.enter_context(open(model_path.parent / location,
                                                             "rb"))
            blob = os.pread(sources[location].fileno(), length, offset)
            digest = hashlib.sha256(blob).hexdigest()
            if digest not in blobs:
                pad = -pack.tell() % (ALIGN if length >= ALIGN else 64)
                pack.write(b"\0" * pad)
                blobs[digest] = pack.tell()
                pack.write(blob)
            return blobs[digest]

        for tensor in model.graph.initializer:
            if tensor.data_location != EXTERNAL:
                continue
            entries = {e.key: e for e in tensor.external_data}
            location = entries["location"].value
            entries["offset"].value = str(put(location, int(entries["offset"].value),
                                              int(entries["length"].value)))
            for k, e in entries.items():  # "kernel+hash|offset;length;alignment|..."
                if k.startswith("prepacked_"):
                    head, *buffers = e.value.split("|")
                    for i, b in enumerate(buffers):
                        offset, length, align = b.split(";")
                        buffers[i] = f"{put(location, int(offset), int(length))};{length};{align}"
                    e.value = "|".join([head, *buffers])
            entries["location"].value = PACK
        pack.flush()
        os.fsync(pack.fileno())
        index["size"] = pack.tell()
    for path, data in ((index_path, json.dumps(index).encode()),
                       (folder / f"{name}.onnx", model.SerializeToString())):
        experts.write_atomic(path, np.frombuffer(data, np.uint8), mode=0o600)


def _build(ort, program: Path, weights: Path, make_options, providers, folder: Path,
           name: str) -> None:
    """Load `program` once with its packed weights saved beside an optimized copy of it,
    and merge them into the pack. ONNX Runtime reads the weights from a hard link of
    `weights` beside a copy of the program (it maps the file and packs from the map: the
    default fp32 model's `score` builds at 98 MB peak RSS instead of 168 MB with the weights
    copied into the session from the caller's buffer, the same files written); where the
    link cannot be made (another file system) they are copied in."""
    work = folder / f".{name}.work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(mode=0o700, parents=True)
    try:
        source, options = program, None
        with contextlib.suppress(OSError):
            os.link(weights, work / "src" / ONNX_DATA)  # the name the graphs' weights use
            shutil.copyfile(program, work / "src" / program.name)
            source, options = work / "src" / program.name, make_options("none")
        options = options or make_options("copy")
        options.optimized_model_filepath = str(work / "model.onnx")
        for entry, value in (("optimized_model_external_initializers_file_name", "model.data"),
                             ("optimized_model_external_initializers_min_size_in_bytes", "1024"),
                             ("save_external_prepacked_constant_initializers", "1")):
            options.add_session_config_entry(f"session.{entry}", value)
        ort.InferenceSession(str(source), options, providers=providers)  # writes the files
        _merge(work / "model.onnx", folder, name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load(ort, program: Path, weights: Path, cache: Path, name: str, make_options, providers):
    """An InferenceSession of `program` (serving `weights`) that maps its weights, packed ones
    included, from the shared pack under `cache`, or None where that cannot be had.
    `make_options(weights)`: fresh SessionOptions as the caller would load the program with,
    its weights copied in ("copy": to build the files where `weights` cannot be linked) or
    none ("none")."""
    try:
        folder = cache / key(ort.__version__, weights)
        name += "-" + hashlib.sha256(json.dumps(_stamp(program)).encode()).hexdigest()[:8]
        model, failed = folder / f"{name}.onnx", folder / f"{name}.failed"
        if failed.exists():  # it failed for this program and these weights before
            return None
        if model.exists() and not _whole(folder):  # a pack cut short: start it again
            with _locked(cache):
                shutil.rmtree(folder, ignore_errors=True)
        if not model.exists():
            for path in (cache.parent, cache):  # the state folder and this one, user only
                path.mkdir(mode=0o700, exist_ok=True)
            with _locked(cache):
                if not model.exists():
                    for old in cache.iterdir():  # the packs of other weights versions
                        if old.is_dir() and old != folder:
                            shutil.rmtree(old, ignore_errors=True)
                    folder.mkdir(mode=0o700, exist_ok=True)
                    _build(ort, program, weights, make_options, providers, folder, name)
        options = make_options("none")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(str(model), options, providers=providers)
    except Exception:  # noqa: BLE001 -- any failure only costs the sharing
        with contextlib.suppress(OSError, NameError):  # and is not tried again
            model.unlink(missing_ok=True)
            failed.touch(mode=0o600)
        return None
