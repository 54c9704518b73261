"""Input readers: JSONL (.gz/.zst), Parquet, plain-text directories, `datasets` saved to disk.

Readers do not decode text: JSONL lines and text files travel as bytes to the decode step, which repairs or
rejects them with a reason. Parquet/HF columns are already strings.
"""

from __future__ import annotations

import gzip
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep.config import SourceConfig
from data_prep.records import Doc

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")


@dataclass(frozen=True)
class Unit:
    """One unit of work for a task: a file (or a whole saved dataset) of one source."""

    source_index: int
    file_index: int
    path: str


def _files(src: SourceConfig, root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = sorted(p for p in root.glob(src.glob) if p.is_file())
    if src.type == "jsonl":
        files = [p for p in files if p.name.endswith(JSONL_SUFFIXES)]
    elif src.type == "parquet":
        files = [p for p in files if p.suffix == ".parquet"]
    return files


def list_units(sources: list[SourceConfig], paths: list[Path]) -> list[Unit]:
    """All units of all sources in a fixed order; `paths[i]` is the resolved root of `sources[i]`."""
    units = []
    for si, (src, root) in enumerate(zip(sources, paths)):
        if src.type == "hf":
            units.append(Unit(si, 0, str(root)))
            continue
        files = _files(src, root)
        if not files:
            log.warning("source %s: no input files under %s", src.name, root)
        units += [Unit(si, fi, str(p)) for fi, p in enumerate(files)]
    return units


def _open_binary(path: Path):
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or path.name
    except ValueError:
        return path.name


def read_unit(unit: Unit, src: SourceConfig, root: Path) -> Iterator[Doc]:
    """Yield the raw records of one unit, each with a stable id and global order key."""
    path = Path(unit.path)
    rel = _rel(path, root) if root.is_dir() else path.name
    base = (unit.source_index, unit.file_index)
    lang = "" if src.lang == "auto" else src.lang
    if src.type in ("jsonl", "demo"):
        with _open_binary(path) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue  # blank lines are not records
                yield Doc(
                    f"{src.name}:{rel}:{i + 1}", src.name, (*base, i), raw=line, kind="jsonl", lang=lang
                )
    elif src.type == "text":
        yield Doc(f"{src.name}:{rel}", src.name, (*base, 0), raw=path.read_bytes(), kind="text", lang=lang)
    elif src.type == "parquet":
        yield from _read_parquet(path, src, rel, base, lang)
    elif src.type == "hf":
        yield from _read_hf(path, src, base, lang)
    else:  # pragma: no cover - the config type is a Literal
        raise ValueError(f"unknown source type {src.type}")


def _read_parquet(path: Path, src: SourceConfig, rel: str, base, lang: str) -> Iterator[Doc]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if src.text_field not in pf.schema_arrow.names:
        raise ValueError(
            f"{path}: parquet has no column '{src.text_field}' (source {src.name}; columns: "
            f"{', '.join(pf.schema_arrow.names)}); set sources[].text_field"
        )
    i = 0
    for batch in pf.iter_batches(columns=[src.text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            yield _str_doc(f"{src.name}:{rel}:{i}", src, (*base, i), value, lang)
            i += 1


def _read_hf(path: Path, src: SourceConfig, base, lang: str) -> Iterator[Doc]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{path}: a DatasetDict; point sources[].path at one split's directory")
    if src.text_field not in ds.column_names:
        raise ValueError(
            f"{path}: dataset has no column '{src.text_field}' (columns: {', '.join(ds.column_names)})"
        )
    for i, value in enumerate(ds[src.text_field]):
        yield _str_doc(f"{src.name}:{i}", src, (*base, i), value, lang)


def _str_doc(doc_id: str, src: SourceConfig, order, value, lang: str) -> Doc:
    doc = Doc(doc_id, src.name, order, kind="str", lang=lang)
    if isinstance(value, str):
        doc.text = value
    else:
        doc.meta["bad_value"] = type(value).__name__  # the decode step rejects it with a reason
    return doc


def preflight(sources: list[SourceConfig], roots: list[Path]) -> None:
    """Fail before any work when a source cannot be what the config says: no files, or a text field that
    its first record does not have (one bad record is accounted for; a wrong field name would remove all)."""
    from kmoe.configtree import ConfigError

    for i, (src, root) in enumerate(zip(sources, roots)):
        units = list_units([src], [root])
        if not units:
            raise ConfigError(
                f"sources[{i}] ({src.name}): no {src.type} input under {root} (glob '{src.glob}')"
            )
        first = Path(units[0].path)
        if src.type in ("jsonl", "demo"):
            keys = _first_json_keys(first)
            if keys is not None and src.text_field not in keys:
                raise ConfigError(
                    f"sources[{i}].text_field: '{src.text_field}' not in the first record of {first} "
                    f"(keys: {', '.join(sorted(keys)[:10])})"
                )
        elif src.type == "parquet":
            import pyarrow.parquet as pq

            names = pq.ParquetFile(first).schema_arrow.names
            if src.text_field not in names:
                raise ConfigError(
                    f"sources[{i}].text_field: no column '{src.text_field}' in {first} ({', '.join(names)})"
                )


def _first_json_keys(path: Path) -> set[str] | None:
    """Keys of the first parseable JSON object among the first lines, or None (nothing to judge by)."""
    import json

    with _open_binary(path) as f:
        for n, line in enumerate(f):
            if n >= 5:
                return None
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return set(obj)
    return None
