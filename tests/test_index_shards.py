"""index_shards: existing tars indexed in place (the real img2dataset's output, committed with the
script that made it), split into parts and merged, into the memory-mapped sample index."""
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.index_shards import main as index_shards
from infd.data.sample_index import CAPTION_TXT, EXCLUDED, HR, SampleIndex
from tests.images import bomb_png, build, write_folder

FIXTURE = Path(__file__).parent / "fixtures" / "img2dataset" / "shards"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_img2dataset_output_is_indexed_in_place(tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(FIXTURE, shards)
    before = {p.name: _sha(p) for p in shards.glob("*.tar")}
    assert index_shards([str(shards), "--output", str(tmp_path / "index"), "--workers", "1",
                         "--hr-threshold", "150"]) == 0
    assert {p.name: _sha(p) for p in shards.glob("*.tar")} == before  # not one byte rewritten
    index = SampleIndex.open(tmp_path / "index")
    assert index.shard_names == ["00000.tar", "00001.tar", "00002.tar"]
    assert len(index.samples) == 12 and list(index.shards["samples"]) == [5, 6, 1]  # the 404 left no sample
    for sid in range(len(index.samples)):
        rec, key = index.samples[sid], index.key(sid)
        tar_path = shards / index.shard_names[rec["shard"]]
        members = _members(tar_path)
        raw = tar_path.read_bytes()
        # The image member's bytes are exactly where the index says: one ranged read.
        assert raw[rec["offset"]:rec["offset"] + rec["size"]] == members[f"{key}.{index.ext(sid)}"]
        assert rec["caption_kind"] == CAPTION_TXT
        caption = raw[rec["caption_offset"]:rec["caption_offset"] + rec["caption_size"]].decode()
        assert caption == members[f"{key}.txt"].decode() == json.loads(members[f"{key}.json"])["caption"]
        meta = json.loads(members[f"{key}.json"])
        img = Image.open(io.BytesIO(members[f"{key}.jpg"]))
        upright = (img.height, img.width) if img.getexif().get(0x0112) in (5, 6, 7, 8) else img.size
        assert (rec["width"], rec["height"]) == upright
        assert bool(rec["flags"] & HR) == (max(upright) >= 150)
        assert rec["flags"] & EXCLUDED == 0 and (meta["width"], meta["height"]) == img.size
    # img2dataset reports the stored size; the index the displayed one (EXIF orientation applied).
    rotated = [sid for sid in range(12) if index.samples[sid]["height"] > index.samples[sid]["width"]
               and Image.open(io.BytesIO(_image(index, shards, sid))).getexif().get(0x0112) in (5, 6, 7, 8)]
    assert len(rotated) == 1
    assert list(index.hr_ids) == [i for i in range(12) if index.samples[i]["flags"] & HR]


def _image(index: SampleIndex, shards: Path, sid: int) -> bytes:
    rec = index.samples[sid]
    raw = (shards / index.shard_names[rec["shard"]]).read_bytes()
    return raw[rec["offset"]:rec["offset"] + rec["size"]]


def test_two_parts_merged_equal_one_pass_and_bad_images_are_excluded(tmp_path):
    sizes = [(64 + 10 * i, 80 + 7 * (i % 4)) for i in range(14)]
    write_folder(tmp_path / "src", sizes)
    build(tmp_path / "src", str(tmp_path / "shards"), "--min-side", "32", "--samples-per-shard", "3")
    # A shard with a decompression bomb and an image-less sample: indexed, excluded, counted.
    with tarfile.open(tmp_path / "shards" / "shard-000099.tar", "w") as tar:
        for name, data in (("bomb.png", bomb_png()), ("bomb.txt", b"huge"), ("textonly.txt", b"no image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    spec = str(tmp_path / "shards")
    common = ["--workers", "1", "--hr-threshold", "120"]
    assert index_shards([spec, "--output", str(tmp_path / "one"), *common]) == 0
    for part in (1, 0):  # any order; each part alone
        assert index_shards([spec, "--output", str(tmp_path / "two"), "--part", str(part), "--num-parts", "2",
                             *common]) == 0
    assert index_shards([spec, "--output", str(tmp_path / "two"), "--num-parts", "2", "--merge"]) == 0
    one, two = SampleIndex.open(tmp_path / "one"), SampleIndex.open(tmp_path / "two")
    for name in ("samples", "shards", "hr_ids", "key_offsets", "keys"):
        assert np.array_equal(getattr(one, name), getattr(two, name)), name
    assert one.meta == two.meta
    assert one.meta["total_samples"] == 16 and one.meta["total_excluded"] == 2
    assert one.meta["skipped"] == {"too_many_pixels": 1, "no_image_member": 1}
    assert one.main_count(len(one.shard_names) - 1, exclude_hr=True) == 0
    assert one.meta["total_hr"] == sum(max(w, h) >= 120 for w, h in sizes) > 0


def test_the_loader_reads_img2dataset_shards_through_the_index(tmp_path):
    """Both streams, with 2 workers, every sample by a ranged read of its span; captions from
    img2dataset's .txt members."""
    from infd.config import from_mapping
    from infd.data.loader import DataConfig, build_loader

    shards = tmp_path / "shards"
    shutil.copytree(FIXTURE, shards)
    assert index_shards([str(shards), "--output", str(shards), "--workers", "1", "--hr-threshold", "150"]) == 0
    cfg = from_mapping(DataConfig, {"shards": str(shards), "batch_size": 2, "num_workers": 2, "p_hr": 0.5,
                                    "patch": {"patch_size": 32, "r_max": 64, "encoder_size": 32}})
    batches = list(build_loader(cfg).epoch_batches())
    captions = {c for b in batches for c in b.captions}
    assert batches and all(c.startswith("a photo number") for c in captions), captions
    kinds = {bool(h) for b in batches for h in b.is_hr.tolist()}
    assert kinds == {True, False}


def test_slurm_array_script_indexes_by_parts_and_merges(tmp_path):
    """cluster/slurm/index_shards.sbatch as SLURM runs it: two array tasks, then the merge job."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, SHARDS=str(FIXTURE), INDEX_DIR=str(tmp_path / "index"), PYTHON=sys.executable,
               SLURM_SUBMIT_DIR=str(root), SLURM_ARRAY_TASK_COUNT="2", SLURM_CPUS_PER_TASK="1")
    script = str(root / "cluster" / "slurm" / "index_shards.sbatch")
    for task in ("1", "0"):
        subprocess.run(["bash", script], env={**env, "SLURM_ARRAY_TASK_ID": task}, check=True, capture_output=True)
    subprocess.run(["bash", script], env={**env, "MERGE": "1"}, check=True, capture_output=True)
    assert index_shards([str(FIXTURE), "--output", str(tmp_path / "one"), "--workers", "1"]) == 0
    merged, one = SampleIndex.open(tmp_path / "index"), SampleIndex.open(tmp_path / "one")
    assert np.array_equal(merged.samples, one.samples) and merged.meta == one.meta


def test_data_stats_and_preview_commands(tmp_path):
    from infd.cli import main as infd

    shards = tmp_path / "shards"
    shutil.copytree(FIXTURE, shards)
    assert index_shards([str(shards), "--output", str(shards), "--workers", "1", "--hr-threshold", "150"]) == 0
    assert infd(["data", "stats", str(shards), "--png", str(tmp_path / "hist.png")]) == 0
    assert Image.open(tmp_path / "hist.png").size == (640, 320)
    assert infd(["data", "preview", str(shards), "--out", str(tmp_path / "grid.png"), "--n", "4",
                 "--patch-size", "32"]) == 0
    assert Image.open(tmp_path / "grid.png").height == 4 * (192 + 24) + 4
    (shards / "index.json").write_text(json.dumps({"version": 1}))
    assert infd(["data", "stats", str(shards)]) == 2  # an old index: a clear error, not a traceback
