"""torch.distributed.checkpoint (DCP) storage for kmoe's sharded checkpoints: safetensors shard files.

DCP plans who writes what (each rank its own shards; replicated tensors once) and, on load, which byte
ranges each rank needs for its new layout (resharding across world size and expert-parallel degree). The
files are plain safetensors with DCP's offsets in the header (`DCP_SHARDING_INFO`, the layout of torch's
`HuggingFaceStorageWriter`), one per rank and part:
  <part>/shard-<rank>.safetensors   part = the DCP key's prefix ("model", "optimizer"); names inside the
                                    file are the key without it (kmoe tensor names, `<param>/<slot>`)
No pickle is written or read (DCP's default `.metadata` is a pickle), and no file is memory-mapped. `ShardWriter` streams each tensor to
disk (kmoe.safetensors_stream), hashing the file as it goes and computing the layout-independent digest
pieces of each block it writes; the coordinator's `finish` receives every rank's file hashes and pieces and
combines them (`summary`): nothing is hashed twice and no tensor moves between ranks. `ShardReader` takes
the chunk map from the checkpoint's manifest instead of trusting whatever files lie in the directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, WriteResult
from torch.futures import Future

from kmoe.hashing import DigestError, Pieces, TensorMeta, box_pieces, combine_pieces
from kmoe.safetensors_stream import StreamWriter, read_header

GLOBAL_SHAPES = "kmoe_global_shapes"  # header metadata: {name: global shape}, so a file describes itself
SHARDING = "DCP_SHARDING_INFO"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shard_file(part: str, rank: int) -> str:
    return f"{part}/shard-{rank:05d}.safetensors"


@dataclass
class WrittenBlock:
    """What the coordinator learns of one block a rank wrote (DCP carries it in WriteResult.storage_data)."""

    file: str  # relative to the checkpoint directory
    name: str  # inside the file
    offsets: list[int]
    sizes: list[int]
    file_sha256: str
    file_bytes: int
    pieces: Pieces


class ShardWriter(FileSystemWriter):
    """Each rank streams its blocks into `<part>/shard-<rank>.safetensors`; see the module docstring."""

    def __init__(self, path: str | Path):
        super().__init__(str(path), single_file_per_rank=True, sync_files=True, overwrite=True)
        self.summary: dict[str, Any] | None = None  # set on the coordinator by finish()

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(p, storage_data={"rank": i}) for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: Any) -> Future[list[WriteResult]]:
        by_part: dict[str, list[Any]] = {}
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise ValueError(f"{item.index.fqn}: sharded checkpoints hold tensors only")
            by_part.setdefault(item.index.fqn.split("/", 1)[0], []).append(item)
        results: list[WriteResult] = []
        for part, items in sorted(by_part.items()):
            results += self._write_file(shard_file(part, plan.storage_data["rank"]), items, planner)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write_file(self, rel: str, items: list[Any], planner: Any) -> list[WriteResult]:
        path = Path(self.path) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        names = [it.index.fqn.split("/", 1)[1] for it in items]
        specs = [
            (n, dtype_name(it.tensor_data.properties.dtype), it.tensor_data.chunk.sizes)
            for n, it in zip(names, items)
        ]
        meta = {
            SHARDING: json.dumps(
                {n: {"saved_offsets": list(it.tensor_data.chunk.offsets)} for n, it in zip(names, items)}
            ),
            GLOBAL_SHAPES: json.dumps({n: list(it.tensor_data.size) for n, it in zip(names, items)}),
            "DCP_VERSION": "1.0",
            "format": "pt",
        }
        writer = StreamWriter(path, specs, meta)
        blocks = []
        # The digest pieces of each block are hashed on a second thread while this one writes and sha256s the
        # file: hashlib and file writes release the GIL, so the two passes overlap where cores allow.
        with ThreadPoolExecutor(1, thread_name_prefix="kmoe-digest") as pool:
            for name, it in zip(names, items):
                t = planner.resolve_data(it).detach().cpu().contiguous()
                gmeta = TensorMeta(dtype_name(t.dtype), tuple(int(s) for s in it.tensor_data.size))
                offsets = [int(o) for o in it.tensor_data.chunk.offsets]
                pieces = pool.submit(box_pieces, gmeta, offsets, t)
                writer.add(name, t)
                blocks.append((name, offsets, list(t.shape), t.numel() * t.element_size(), pieces))
            blocks = [(*b[:4], b[4].result()) for b in blocks]
        sha, total = writer.close()
        return [
            WriteResult(
                index=it.index,
                size_in_bytes=n,
                storage_data=WrittenBlock(rel, name, off, sizes, sha, total, pieces),
            )
            for it, (name, off, sizes, n, pieces) in zip(items, blocks)
        ]

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """On the coordinator: file hashes, the chunk map and every tensor's digest, from all ranks' writes."""
        blocks: list[WrittenBlock] = [r.storage_data for rank in results for r in rank]
        files = {b.file: {"sha256": b.file_sha256, "bytes": b.file_bytes} for b in blocks}
        shards: dict[str, dict[str, Any]] = {}
        pieces: dict[str, list[Pieces]] = {}
        for b in blocks:
            shards.setdefault(b.file, {})[b.name] = {"offsets": b.offsets, "sizes": b.sizes}
            pieces.setdefault(f"{b.file.split('/', 1)[0]}/{b.name}", []).append(b.pieces)
        tensors: dict[str, dict[str, Any]] = {}
        for key, md in sorted(metadata.state_dict_metadata.items()):
            part, name = key.split("/", 1)
            try:
                digest = combine_pieces(pieces.get(key, []))
            except DigestError as e:
                raise DigestError(f"checkpoint tensor '{key}': {e}") from None
            assert isinstance(md, TensorStorageMetadata)
            tensors.setdefault(part, {})[name] = {"dtype": dtype_name(md.properties.dtype), "shape": list(md.size),
                                                  "digest": digest}  # fmt: skip
        self.summary = {
            "files": dict(sorted(files.items())),
            "shards": dict(sorted(shards.items())),
            "tensors": tensors,
        }


@dataclass
class _Stored:
    relative_path: str  # absolute path of the shard file
    name: str
    shape: torch.Size
    dtype: torch.dtype


class ShardReader(StorageReader):
    """Reads the blocks a rank needs for its own layout, from the files the manifest names, with plain
    reads into the target tensors (no memory map, so a rank's memory holds its own blocks and nothing else
    of the files; a block cut across rows goes through a buffer of the rows it spans)."""

    def __init__(self, path: str | Path, manifest: dict[str, Any]):
        super().__init__()
        self.path, self.manifest = Path(path), manifest
        self.storage_data: dict[MetadataIndex, _Stored] = {}
        self.load_id = ""

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        sdm: dict[str, Any] = {}
        for part, tensors in self.manifest["tensors"].items():
            for name, t in tensors.items():
                props = TensorProperties(dtype=getattr(torch, t["dtype"]))
                sdm[f"{part}/{name}"] = TensorStorageMetadata(props, torch.Size(t["shape"]), [])
        storage: dict[MetadataIndex, _Stored] = {}
        for rel, entries in self.manifest["shards"].items():
            part = rel.split("/", 1)[0]
            for name, ch in entries.items():
                key, off = f"{part}/{name}", torch.Size(ch["offsets"])
                sdm[key].chunks.append(ChunkStorageMetadata(off, torch.Size(ch["sizes"])))
                storage[MetadataIndex(key, off)] = _Stored(
                    str(self.path / rel), name, torch.Size(ch["sizes"]), sdm[key].properties.dtype
                )
        md = Metadata(state_dict_metadata=sdm, storage_data=storage)
        md.storage_meta = StorageMeta()
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kw: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: Any) -> Future[None]:
        per_file: dict[str, list[Any]] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for file, reqs in sorted(per_file.items()):
            header, start = read_header(file)
            with open(file, "rb", buffering=0) as f:
                for req in reqs:
                    self._read(f, file, header, start, req, planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read(self, f: Any, file: str, header: dict[str, Any], start: int, req: Any, planner: Any) -> None:
        info = self.storage_data[req.storage_index]
        entry = header.get(info.name)
        if entry is None or list(entry["shape"]) != list(info.shape):
            raise ValueError(
                f"{file}: holds no block {info.name} of shape {list(info.shape)} (replaced file?)"
            )
        shape, es = list(info.shape), torch.empty(0, dtype=info.dtype).element_size()
        row = es * math.prod(shape[1:]) if shape else es
        lo = req.storage_offsets[0] if shape else 0
        n = req.lengths[0] if shape else 1
        target = planner.resolve_tensor(req).detach()
        whole_rows = list(req.lengths[1:]) == shape[1:] and all(o == 0 for o in req.storage_offsets[1:])
        buf = (
            target
            if whole_rows and target.is_contiguous()
            else torch.empty([n, *shape[1:]] if shape else [], dtype=info.dtype)
        )
        f.seek(start + entry["data_offsets"][0] + lo * row)
        view = memoryview(buf.view(-1).view(torch.uint8).numpy()) if buf.numel() else memoryview(b"")
        if f.readinto(view) != len(view):
            raise ValueError(f"{file}: block {info.name} is cut short (truncated file)")
        if buf is not target:
            idx = tuple(slice(o, o + m) for o, m in zip(req.storage_offsets[1:], req.lengths[1:]))
            target.copy_(buf[(slice(None), *idx)] if shape else buf)
        planner.commit_tensor(req, target)
