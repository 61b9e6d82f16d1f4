"""Quantize once: a checkpoint's experts, encoded for one `experts_dtype`, kept on disk so the
next `load` reads them instead of quantizing again.

    load(path, experts_dtype="int4")
      fill_experts: a copy whose fingerprints match?  yes -> read it into the store (no encoding)
                                                      no  -> encode from the checkpoint, write the copy

The copy is a folder of safetensors files, one per MoE layer (memory stays bounded by one
expert while reading or writing), each tensor one part of one expert as the store holds it
(`experts.{expert_id}.{part}`, e.g. `experts.3.down_proj.q`), and a `manifest.json` written
last. It is valid only if the manifest's fingerprints match:
- the source: every checkpoint file's name, size, mtime and safetensors header, hashed. Not
  the bytes: hashing all of a 90 GB checkpoint takes minutes, and a rewritten shard changes
  its size or mtime; the header holds every tensor's name, dtype, shape and offsets. An edit in
  place that keeps the size and restores the mtime goes unnoticed;
- the settings: `experts_dtype`, each parameter's format (int4 group size and layout: torch's CPU
  kernel packs per machine, so a copy made with AVX2 is rewritten on an AVX-512 one), the stored
  layout and `FORMAT_VERSION`.

Where: beside the checkpoint (`<folder>/moe_prefetch/<experts_dtype>-<settings>/`) or, when that
folder is not writable (a demo installed in site-packages) or lacks the room, under
`$MOE_PREFETCH_CACHE` or `~/.cache/moe-prefetch/quantized/`, in a folder named by a hash of the
checkpoint's path. Writing goes to a temporary folder renamed into place once complete, so an
interrupted run never leaves a copy that looks valid.
A copy that does not match or does not read is ignored with a log line and written again.

Only quantized formats get a copy: a cast (bf16 from fp32) is as fast as reading the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..experts.compression import Cast, Codec

logger = logging.getLogger(__name__)

FORMAT = "moe-prefetch/quantized-experts"
FORMAT_VERSION = 2  # 2: int4 as (q - 8) * scale + zero, `sz` parts, torch's CPU block layout
CACHE_ENV = "MOE_PREFETCH_CACHE"
MANIFEST = "manifest.json"
_SAFETENSORS_DTYPES = {
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


class _Unusable(Exception):
    """A copy that is corrupt or belongs to other weights or settings; the message says which."""


@dataclass(frozen=True)
class CopyInfo:
    """Where a quantized copy is, and its size against the experts it was made from."""

    path: Path
    experts_dtype: str
    reused: bool  # an existing copy was valid, nothing was encoded
    source_bytes: int  # the experts' tensors in the checkpoint files
    copy_bytes: int  # the copy's files on disk


def wanted(codec: Codec, experts_dtype: str) -> bool:
    """A copy pays off only where encoding quantizes; "auto" is the checkpoint's own format."""
    return experts_dtype != "auto" and not all(isinstance(f, Cast) for f in codec.formats.values())


# -- fingerprints --------------------------------------------------------------------------
def source_fingerprint(folder: Path, files: Iterable[str]) -> str:
    """Hash of each file's name, size, mtime and safetensors header (see the module docstring:
    the weights' bytes are not read), plus config.json and the shard index."""
    digest = hashlib.sha256()
    extra = [folder / n for n in ("config.json", "model.safetensors.index.json") if (folder / n).is_file()]
    for file in sorted({Path(f) for f in files} | set(extra)):
        stat = file.stat()
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        if file.suffix == ".safetensors":
            with open(file, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                digest.update(f.read(min(length, stat.st_size)))
    return digest.hexdigest()


def _expected(codec: Codec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Stored part name -> (shape, dtype) of one expert, from the codec's typed views."""
    typed = codec.typed(torch.empty(1, codec.stored.numel, dtype=torch.uint8))
    return {f"{p}.{q}": (tuple(v.shape[1:]), v.dtype) for p, parts in typed.items() for q, v in parts.items()}


def settings_fingerprint(codec: Codec, experts_dtype: str) -> str:
    """Hash of everything that decides the stored bytes besides the weights."""
    formats = {p: [f.name, getattr(f, "group", None), getattr(f, "layout", None)] for p, f in codec.formats.items()}
    parts = {name: [list(shape), str(dtype)] for name, (shape, dtype) in _expected(codec).items()}
    settings = {"version": FORMAT_VERSION, "experts_dtype": experts_dtype, "formats": formats, "parts": parts}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# -- locations -------------------------------------------------------------------------------
def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    # Beside the corpus cache (corpus.py): one folder for everything moe-prefetch caches.
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe-prefetch" / "quantized"


def locations(folder: Path, experts_dtype: str, settings: str) -> list[Path]:
    """Where a copy may be, in the order they are tried: beside the checkpoint, then the cache."""
    name = f"{experts_dtype}-{settings[:12]}"
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    cached = cache_root() / key / name
    if folder.resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        return [cached]  # a shipped demo: the package folder (moe_prefetch/) holds code, never data we write
    return [folder / "moe_prefetch" / name, cached]


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _writable(path: Path) -> bool:
    """Whether `path` can be created: its nearest existing folder is writable by us."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.access(path, os.W_OK | os.X_OK)


# -- reading ------------------------------------------------------------------------------------
def _check(path: Path, source: str, settings: str, layers) -> dict:
    """The manifest of the copy at `path` if it matches; `_Unusable` naming why not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise _Unusable("it has no manifest (an interrupted write)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _Unusable(f"its manifest is unreadable ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _Unusable("its manifest is not a quantized copy's")
    if manifest.get("settings") != settings:
        raise _Unusable("it was written with other settings (format version, group size)")
    if manifest.get("source") != source:
        raise _Unusable("the checkpoint changed since it was written")
    for layer in layers:
        entry = manifest.get("layers", {}).get(str(layer.layer_idx))
        if not entry or entry.get("num_experts") != layer.num_experts:
            raise _Unusable(f"it lacks MoE layer {layer.layer_idx}")
        file = path / entry["file"]
        if not file.is_file() or file.stat().st_size != entry.get("bytes"):
            raise _Unusable(f"{file.name} is missing or has the wrong size")
    return manifest


def _read_layer(file: Path, layer, expected, source: str, settings: str) -> Iterator[tuple[int, dict]]:
    """`(expert_id, stored parts)` of one layer's file, each part checked against `expected`."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata() or {}
            if (meta.get("source"), meta.get("settings"), meta.get("layer_idx")) != (
                source,
                settings,
                str(layer.layer_idx),
            ):
                raise _Unusable(f"{file.name} belongs to another copy")
            for e in range(layer.num_experts):
                parts = {}
                for name, (shape, dtype) in expected.items():
                    tensor = handle.get_tensor(f"experts.{e}.{name}")
                    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                        raise _Unusable(f"{file.name}: experts.{e}.{name} is {tensor.dtype} {tuple(tensor.shape)}")
                    parts[name] = tensor
                yield e, parts
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _Unusable(f"{file.name} does not read ({err})") from None


def find(folder: Path, codec: Codec, experts_dtype: str, source: str, layers) -> Path | None:
    """The first valid copy for these weights and settings, or None (each one passed over is logged)."""
    settings = settings_fingerprint(codec, experts_dtype)
    for path in locations(folder, experts_dtype, settings):
        if not path.is_dir():
            continue
        try:
            _check(path, source, settings, layers)
            return path
        except _Unusable as why:
            logger.warning("ignoring the quantized copy at %s: %s; it will be written again", path, why)
    return None


# -- writing ------------------------------------------------------------------------------------
def _write_safetensors(file: Path, tensors, chunks: Iterable[torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file written as it streams: `tensors` is `[(name, shape, dtype)]` in file
    order and `chunks` their bytes in that order (flat uint8), so no whole layer is ever held in
    memory (safetensors' own `save_file` serialises every tensor first)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in tensors:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    written = 0
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for chunk in chunks:
            data = chunk.contiguous().view(torch.uint8).numpy()
            f.write(memoryview(data))
            written += data.nbytes
        f.flush()
        os.fsync(f.fileno())  # the rename that publishes the copy must not overtake the data
    if written != offset:
        raise OSError(f"wrote {written} bytes for {file.name}, its header says {offset}")


class Writer:
    """Writes a copy into a temporary folder, one layer at a time; `commit` renames it into place."""

    def __init__(self, path: Path, codec: Codec, experts_dtype: str, source: str, folder: Path):
        self.path = path
        self.codec = codec
        self.expected = _expected(codec)
        self.settings = settings_fingerprint(codec, experts_dtype)
        self.manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "experts_dtype": experts_dtype,
            "codec": codec.describe(),
            "expert_bytes": codec.nbytes,
            "settings": self.settings,
            "source": source,
            "source_folder": str(folder.resolve()),
            "layers": {},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()

    def layer(self, layer, experts: Iterable[dict[str, torch.Tensor]]) -> None:
        """Write one layer from its experts' stored parts (flat uint8 by name), in expert order."""
        names = list(self.expected)
        tensors = [(f"experts.{e}.{n}", *self.expected[n]) for e in range(layer.num_experts) for n in names]
        chunks = (parts[n] for parts in experts for n in names)
        file = f"layer_{layer.layer_idx:03d}.safetensors"
        metadata = {
            "format": FORMAT,
            "source": self.manifest["source"],
            "settings": self.settings,
            "layer_idx": str(layer.layer_idx),
        }
        _write_safetensors(self.tmp / file, tensors, chunks, metadata)
        self.manifest["layers"][str(layer.layer_idx)] = {
            "file": file,
            "num_experts": layer.num_experts,
            "bytes": (self.tmp / file).stat().st_size,
        }

    def commit(self) -> Path:
        """Write the manifest and put the folder in place of any older copy there."""
        (self.tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=1))
        old = self.path.with_name(f".{self.path.name}.{os.getpid()}.old")
        if self.path.exists():
            os.replace(self.path, old)  # a folder cannot be renamed over a non-empty one
        os.replace(self.tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _remove_stale(path: Path) -> None:
    """Temporary folders left by writers that died (their process is gone)."""
    for tmp in path.parent.glob(f".{path.name}.*.*"):
        try:
            os.kill(int(tmp.name.split(".")[-2]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue


def open_writer(folder: Path, codec: Codec, experts_dtype: str, source: str, layers) -> Writer | None:
    """A writer at the first location that can be written and has room, or None (logged) if none can."""
    settings = settings_fingerprint(codec, experts_dtype)
    needed = sum(layer.num_experts for layer in layers) * codec.nbytes
    for path in locations(folder, experts_dtype, settings):
        if not _writable(path):
            logger.info("cannot write a quantized copy at %s (not writable); trying the next place", path)
            continue
        free = _free_bytes(path)
        if free < needed:  # checked up front: a copy that fills the disk halfway is time lost
            logger.info(
                "no room for a quantized copy at %s (%.2f GiB needed, %.2f GiB free); trying the next place",
                path,
                needed / 2**30,
                free / 2**30,
            )
            continue
        try:
            return Writer(path, codec, experts_dtype, source, folder)
        except OSError as err:
            logger.info("cannot write a quantized copy at %s (%s); trying the next place", path, err)
    logger.warning(
        "no writable place with room for a quantized copy of the experts (set %s to a writable folder): "
        "the next load quantizes again",
        CACHE_ENV,
    )
    return None


# -- load ---------------------------------------------------------------------------------------
def fill_experts(store, layers, checkpoint, folder: Path, experts_dtype: str) -> Path | None:
    """Fill `store` with every layer's experts: from a valid quantized copy when there is one,
    otherwise encoded from `checkpoint` (and the copy written). Returns the copy's path, or None
    when no copy is used (a format that does not quantize)."""
    codec = store.codec

    def from_checkpoint(layer):
        for e in range(layer.num_experts):
            yield e, checkpoint.expert(layer.path, e, layer.num_experts, store.spec)

    if not wanted(codec, experts_dtype):
        for layer in layers:
            store.fill(layer.layer_idx, from_checkpoint(layer))
        return None
    source = source_fingerprint(folder, checkpoint.keys.values())
    path = find(folder, codec, experts_dtype, source, layers)
    if path is not None:
        try:
            _read(store, path, layers, codec, experts_dtype, source)
            logger.info("read the %s experts from the quantized copy at %s", experts_dtype, path)
            return path
        except _Unusable as why:
            logger.warning("ignoring the quantized copy at %s: %s; it will be written again", path, why)
    writer = open_writer(folder, codec, experts_dtype, source, layers)
    try:
        for layer in layers:
            store.fill(layer.layer_idx, from_checkpoint(layer))
            if writer is not None:
                writer = _write_from_store(writer, store, layer)
    except BaseException:  # a bad checkpoint, Ctrl-C: no half-written folder is left behind
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        return None
    try:
        path = writer.commit()
    except OSError as err:
        logger.warning("could not put the quantized copy in place at %s: %s", writer.path, err)
        writer.abort()
        return None
    logger.info("quantized the experts to %s and wrote the copy to %s", experts_dtype, path)
    return path


def _write_from_store(writer: Writer, store, layer) -> Writer | None:
    """Write one layer's stored rows; a failure to write (disk full) only costs the copy."""
    rows = (store.codec.stored.views(store[(layer.layer_idx, e)]) for e in range(layer.num_experts))
    try:
        writer.layer(layer, rows)
        return writer
    except OSError as err:
        logger.warning("stopped writing the quantized copy at %s: %s", writer.path, err)
        writer.abort()
        return None


def _read(store, path: Path, layers, codec: Codec, experts_dtype: str, source: str) -> None:
    settings = settings_fingerprint(codec, experts_dtype)
    manifest = _check(path, source, settings, layers)
    expected = _expected(codec)
    for layer in layers:
        file = path / manifest["layers"][str(layer.layer_idx)]["file"]
        store.fill_stored(layer.layer_idx, _read_layer(file, layer, expected, source, settings))


# -- ahead of time --------------------------------------------------------------------------------
def quantize(
    path, experts_dtype: str, device: str = "auto", dtype=None, progress: Callable[[int, int], None] | None = None
) -> CopyInfo:
    """Write the quantized copy `load(path, experts_dtype=...)` would read, without loading the
    model: one expert at a time from the checkpoint. `device` and `dtype` as for `load` (the
    model's dtype decides how biases are stored). `progress(done, total)` is called as experts are done.
    An existing valid copy is kept."""
    from ..errors import CheckpointError, ConfigError
    from ..experts.compression import make_codec
    from .folders import resolve_path
    from .integration import resolve_device
    from .skeleton import check_expert_shapes, open_skeleton

    folder = resolve_path(path)
    target, _ = resolve_device(device)
    skeleton = open_skeleton(folder, target, dtype)
    layers, spec, checkpoint = skeleton.layers, skeleton.spec, skeleton.checkpoint
    keys = checkpoint.keys
    check_expert_shapes(checkpoint, layers, spec)  # before anything is written
    codec = make_codec(spec, experts_dtype)
    if not wanted(codec, experts_dtype):
        raise ConfigError(
            f"--experts-dtype {experts_dtype} does not quantize ({codec.describe()}): load reads the checkpoint "
            "directly; use int8 or int4"
        )
    source_bytes = _source_bytes(checkpoint, {f"{layer.path}.{n}" for layer in layers for n in spec.names})
    source = source_fingerprint(folder, keys.values())
    found = find(folder, codec, experts_dtype, source, layers)
    total, done = sum(layer.num_experts for layer in layers), 0
    if found is not None:
        if progress is not None:
            progress(total, total)
        return CopyInfo(found, experts_dtype, True, source_bytes, _size(found))
    writer = open_writer(folder, codec, experts_dtype, source, layers)
    if writer is None:
        raise CheckpointError(f"cannot write a quantized copy beside {folder} or in the cache; set {CACHE_ENV}")

    def encoded(layer):
        nonlocal done
        for e in range(layer.num_experts):
            yield codec.encode(checkpoint.expert(layer.path, e, layer.num_experts, spec))
            done += 1
            if progress is not None:
                progress(done, total)

    try:
        for layer in layers:
            writer.layer(layer, encoded(layer))
        out = writer.commit()
    except (SafetensorError, OSError) as err:
        writer.abort()
        raise CheckpointError(
            f"quantizing into {writer.path} failed ({err}); check the checkpoint files and the free disk space"
        ) from None
    except BaseException:
        writer.abort()
        raise
    return CopyInfo(out, experts_dtype, False, source_bytes, _size(out))


def _source_bytes(checkpoint, expert_names: set[str]) -> int:
    """Bytes of the checkpoint tensors the experts are read from, from the headers."""
    from .folders import _open

    keys = {
        k
        for name in expert_names
        if name in checkpoint.targets
        for ks in checkpoint.targets[name].sources.values()
        for k in ks
    }
    itemsize = {v: k.itemsize for k, v in _SAFETENSORS_DTYPES.items()} | {"BOOL": 1}
    total = 0
    for key in keys:
        tensor = _open(checkpoint.keys[key]).get_slice(key)
        total += math.prod(tensor.get_shape()) * itemsize.get(tensor.get_dtype(), 1)
    return total


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
