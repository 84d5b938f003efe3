import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from infd.data.sample_index import SampleIndex
from infd.data.urls import read_range
from tests.images import (bomb_png, build, exif_rotated_jpeg, jpeg_bytes, noise_image, png_bytes, sixteen_bit_png,
                          write_folder)


def tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_folder_shards_keep_bytes_and_index_counts(tmp_path):
    sizes = [(300, 260), (1100, 700), (640, 1280), (256, 256), (2000, 1000), (500, 300), (100, 90)]
    paths = write_folder(tmp_path / "src", sizes)
    index = build(tmp_path / "src", str(tmp_path / "out"), "--samples-per-shard", "3")
    # (100, 90) is below min_side 256; (2000, 1000) is within aspect 3.
    assert index["total_samples"] == 6
    assert index["build"]["skipped"] == {"too_small": 1}
    small = [min(Image.open(p).size) < 256 for p in sorted(paths)]  # shards take the sorted file list in order
    shards = SampleIndex.open(tmp_path / "out").shards
    assert list(shards["samples"]) == [len(small[i:i + 3]) - sum(small[i:i + 3]) for i in (0, 3, 6)]
    assert index["total_hr"] == 3 == shards["hr"].sum()  # long side >= 1024
    assert sum(index["resolution_histogram"]["counts"]) == 6
    members = {}
    for name, size in zip(index["shards"], shards["bytes"]):
        members.update(tar_members(tmp_path / "out" / name))
        assert size == (tmp_path / "out" / name).stat().st_size
    sorted_paths = sorted(paths)  # keys follow the sorted file list
    for i, path in enumerate(sorted_paths):
        key = f"{i:09d}"
        if f"{key}.json" not in members:
            continue
        meta = json.loads(members[f"{key}.json"])
        assert members[f"{key}.jpg"] == path.read_bytes()  # original bytes kept
        assert meta["caption"] == path.with_suffix(".txt").read_text()
        assert (meta["width"], meta["height"]) == Image.open(path).size
        assert meta["converted_from"] is None


def test_index_points_at_the_image_bytes_inside_the_tar(tmp_path):
    write_folder(tmp_path / "src", [(1200, 800), (400, 400), (900, 1500)])
    build(tmp_path / "src", str(tmp_path / "out"))
    index = SampleIndex.open(tmp_path / "out")
    assert len(index.hr_ids) == 2
    for sid in index.hr_ids:
        rec = index.samples[sid]
        url = str(tmp_path / "out" / index.shard_names[rec["shard"]])
        data = read_range(url, int(rec["offset"]), int(rec["size"]))
        assert Image.open(io.BytesIO(data)).size == (rec["width"], rec["height"])
        assert tar_members(url)[f"{index.key(sid)}.{index.ext(sid)}"] == data


def test_conversions_and_rejections_are_recorded(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "cmyk.jpg").write_bytes(jpeg_bytes(noise_image(300, 300, 1, "CMYK")))
    (src / "gray.jpg").write_bytes(jpeg_bytes(noise_image(300, 300, 2, "L")))
    (src / "gray.json").write_text('{"caption": "a grey square",')  # a sidecar cut short: counted, image kept
    (src / "wide.json").write_text('["not", "an", "object"]')
    (src / "rgba.png").write_bytes(png_bytes(noise_image(300, 300, 3, "RGBA")))
    (src / "deep.png").write_bytes(sixteen_bit_png(300, 300))
    pal = noise_image(300, 300, 4).convert("P")
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    (src / "palette_alpha.png").write_bytes(buf.getvalue())
    (src / "rotated.jpg").write_bytes(exif_rotated_jpeg(400, 300))
    (src / "bomb.png").write_bytes(bomb_png())
    (src / "empty.jpg").write_bytes(b"")
    (src / "text.jpg").write_bytes(b"this is not an image")
    (src / "truncated.jpg").write_bytes(jpeg_bytes(noise_image(600, 600, 6))[:3000])
    (src / "wide.jpg").write_bytes(jpeg_bytes(noise_image(1600, 300, 7)))
    index = build(src, str(tmp_path / "out"))
    assert index["total_samples"] == 6
    assert index["build"]["converted"] == {"mode_CMYK": 1, "mode_RGBA": 1, "mode_I;16": 1, "mode_P": 1}
    assert index["build"]["skipped"] == {"too_many_pixels": 1, "empty_file": 1, "not_an_image": 1, "corrupt_image": 1,
                                "aspect_ratio": 1}
    assert index["build"]["ignored"] == {"bad_json": 2}
    members = tar_members(tmp_path / "out" / "shard-000000.tar")
    metas = {json.loads(v)["source"]: json.loads(v) for k, v in members.items() if k.endswith(".json")}
    assert metas["rotated.jpg"]["width"] == 300 and metas["rotated.jpg"]["height"] == 400  # EXIF applied
    assert metas["gray.jpg"]["converted_from"] is None  # grayscale JPEG bytes are usable as they are
    deep_key = metas["deep.png"]["key"]
    deep = Image.open(io.BytesIO(members[f"{deep_key}.png"]))
    assert deep.mode == "RGB" and np.asarray(deep).max() > 200  # scaled from 16 bits, not clipped to white
    assert np.asarray(deep).min() < 50


def test_img2dataset_directory_with_laion_filters(tmp_path):
    src = tmp_path / "i2d"
    src.mkdir()
    rows = []
    with tarfile.open(src / "00000.tar", "w") as tar:
        for i, (punsafe, wm, aes) in enumerate([(0.1, 0.1, 6.0), (0.9, 0.1, 6.0), (0.1, 0.95, 6.0), (0.2, 0.3, 4.0)]):
            key = f"{i:09d}"
            meta = {"key": key, "caption": f"a photo {i}", "punsafe": punsafe, "pwatermark": wm,
                    "AESTHETIC_SCORE": aes, "width": 320, "height": 300, "original_width": 640,
                    "original_height": 600, "status": "success", "url": f"http://example.invalid/{i}.jpg"}
            rows.append(meta)
            for ext, data in (("jpg", jpeg_bytes(noise_image(320, 300, i))), ("txt", f"a photo {i}".encode()),
                              ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.Table.from_pylist(rows), src / "00000.parquet")
    index = build(src, str(tmp_path / "out"), "--min-aesthetic", "5")
    assert index["total_samples"] == 1
    assert index["build"]["skipped"] == {"laion_punsafe": 1, "laion_pwatermark": 1, "laion_aesthetic": 1}
    meta = json.loads(tar_members(tmp_path / "out" / "shard-000000.tar")["000000000.json"])
    assert meta["caption"] == "a photo 0" and meta["meta"]["original_width"] == 640


def test_laion_parquet_with_local_files(tmp_path):
    src = tmp_path / "laion"
    paths = write_folder(src / "images", [(300, 300), (500, 400), (260, 600)], captions=False)
    rows = [{"filepath": str(p.relative_to(src)), "TEXT": f"text {i}", "punsafe": 0.0 if i != 1 else 0.99}
            for i, p in enumerate(paths)]
    pq.write_table(pa.Table.from_pylist(rows), src / "meta.parquet")
    index = build(src / "meta.parquet", str(tmp_path / "out"))
    assert index["total_samples"] == 2 and index["build"]["skipped"] == {"laion_punsafe": 1}
    members = tar_members(tmp_path / "out" / "shard-000000.tar")
    assert json.loads(members["000000002.json"])["caption"] == "text 2"


def test_rebuild_is_deterministic_and_resumes_only_unfinished_shards(tmp_path):
    write_folder(tmp_path / "src", [(300 + 10 * i, 280) for i in range(7)])
    build(tmp_path / "src", str(tmp_path / "a"), "--samples-per-shard", "2")
    build(tmp_path / "src", str(tmp_path / "b"), "--samples-per-shard", "2")
    for i in range(4):
        name = f"shard-{i:06d}.tar"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # Interrupt: shard 2 lost its stats (never finished) and left a partial tar behind.
    out = tmp_path / "a"
    (out / "shard-000002.json").unlink()
    (out / "shard-000002.tar").rename(out / "shard-000002.tar.tmp")
    kept = {i: (out / f"shard-{i:06d}.tar").stat().st_mtime_ns for i in (0, 1, 3)}
    index = build(tmp_path / "src", str(out), "--samples-per-shard", "2")
    assert {i: (out / f"shard-{i:06d}.tar").stat().st_mtime_ns for i in (0, 1, 3)} == kept
    assert (out / "shard-000002.tar").read_bytes() == (tmp_path / "b" / "shard-000002.tar").read_bytes()
    assert not list(out.glob("*.tmp"))
    assert index["total_samples"] == 7


def test_two_parts_then_merge_equal_one_build(tmp_path):
    import numpy as np

    write_folder(tmp_path / "src", [(300 + 40 * i, 280 + 30 * (i % 3)) for i in range(9)] + [(1100, 900)])
    common = ("--samples-per-shard", "2", "--hr-threshold", "600")
    one = build(tmp_path / "src", str(tmp_path / "one"), *common)
    for part in (1, 0):
        build(tmp_path / "src", str(tmp_path / "two"), *common, "--part", str(part), "--num-parts", "2")
    assert not (tmp_path / "two" / "index.json").exists()
    two = build(tmp_path / "src", str(tmp_path / "two"), *common, "--num-parts", "2", "--merge")
    assert one == two
    for tar in sorted((tmp_path / "one").glob("*.tar")):
        assert tar.read_bytes() == (tmp_path / "two" / tar.name).read_bytes()
    a, b = SampleIndex.open(tmp_path / "one"), SampleIndex.open(tmp_path / "two")
    for name in ("samples", "shards", "hr_ids", "key_offsets", "keys"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
