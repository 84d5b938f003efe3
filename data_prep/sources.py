"""Where raw images come from, as picklable jobs: one job = one output shard.

- folder: image files found recursively, sorted; captions from a sidecar .txt or .json.
- img2dataset: its output directory (tar shards of jpg/txt/json, plus parquet); one job per tar.
- parquet: LAION-style rows whose path column points at local files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from infd.data.decode import IMAGE_SUFFIXES
from infd.data.tar_samples import TruncatedShard, iterate_tar

PATH_COLUMNS = ("path", "filepath", "file", "image_path")
CAPTION_COLUMNS = ("caption", "TEXT", "text")


def folder_jobs(root: Path, per_shard: int) -> list[dict]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    items = [{"key": f"{i:09d}", "path": str(p), "source": str(p.relative_to(root))} for i, p in enumerate(files)]
    return [{"kind": "files", "items": items[i:i + per_shard]} for i in range(0, len(items), per_shard)]


def parquet_jobs(path: Path, per_shard: int, path_column: str | None = None) -> list[dict]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    items = []
    for file in files:
        rows = pq.read_table(file).to_pylist()
        if not rows:
            continue
        column = path_column or next((c for c in PATH_COLUMNS if c in rows[0]), None)
        if column is None:
            raise ValueError(f"{file} has no image path column (looked for {PATH_COLUMNS}); pass --path-column")
        for row in rows:
            image = Path(row[column])
            image = image if image.is_absolute() else file.parent / image
            caption = next((row[c] for c in CAPTION_COLUMNS if row.get(c)), None)
            meta = {k: v for k, v in row.items() if k != column and _jsonable(v)}
            items.append({"key": f"{len(items):09d}", "path": str(image), "caption": caption, "meta": meta,
                          "source": row[column]})
    return [{"kind": "files", "items": items[i:i + per_shard]} for i in range(0, len(items), per_shard)]


def img2dataset_jobs(root: Path) -> list[dict]:
    tars = sorted(root.glob("*.tar"))
    if not tars:
        raise ValueError(f"{root} holds no .tar: is it an img2dataset output directory?")
    return [{"kind": "tar", "tar": str(t)} for t in tars]


def _jsonable(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def sidecar(path: Path, ignore) -> tuple[str | None, dict]:
    """Caption and metadata from path.with_suffix('.txt' / '.json') when present; a .json that does
    not parse to an object goes to `ignore("bad_json", detail)` (counted, the image is kept)."""
    caption, meta = None, {}
    txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
    if txt.exists():
        caption = txt.read_text(errors="replace").strip()
    if js.exists():
        meta = parse_meta(js.read_bytes(), str(js), ignore)
        caption = caption or meta.get("caption") or meta.get("text")
    return caption, meta


def parse_meta(data: bytes, where: str, ignore) -> dict:
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        ignore("bad_json", f"{where}: {err}")
        return {}
    if not isinstance(meta, dict):
        ignore("bad_json", f"{where}: a JSON {type(meta).__name__}, not an object")
        return {}
    return meta


def job_items(job: dict, skip, ignore) -> Iterator[dict]:
    """Yield {"key", "data", "caption", "meta", "source"} for a job; unreadable inputs go to
    `skip(reason, detail)`, unreadable metadata of a kept image to `ignore(reason, detail)`."""
    if job["kind"] == "files":
        for item in job["items"]:
            path = Path(item["path"])
            try:
                data = path.read_bytes()
            except OSError as err:
                skip("unreadable_file", f"{path}: {err}")
                continue
            caption, meta = item.get("caption"), dict(item.get("meta") or {})
            if "meta" not in item:
                caption, meta = sidecar(path, ignore)
            yield {"key": item["key"], "data": data, "caption": caption, "meta": meta, "source": item["source"]}
        return
    yield from _img2dataset_tar(Path(job["tar"]), skip, ignore)


def _img2dataset_tar(path: Path, skip, ignore) -> Iterator[dict]:
    with open(path, "rb") as stream:
        try:
            for members in iterate_tar(stream):
                item = _img2dataset_item(path, members, skip, ignore)
                if item is not None:
                    yield item
        except TruncatedShard as err:
            skip("truncated_input_tar", f"{path}: {err}")


def _img2dataset_item(path: Path, members: dict, skip, ignore) -> dict | None:
    key = members["__key__"]
    image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
    if image_ext is None:
        skip("no_image_member", f"{path}:{key}")
        return None
    meta = parse_meta(members["json"], f"{path}:{key}.json", ignore) if "json" in members else {}
    caption = members["txt"].decode(errors="replace").strip() if "txt" in members else meta.get("caption")
    return {"key": key, "data": members[image_ext], "caption": caption, "meta": meta, "source": f"{path.name}:{key}"}
