"""Shards on a real S3-compatible server (moto_server on 127.0.0.1, started by the fixtures)."""
import itertools

import boto3
import numpy as np
import pytest
import torch

from infd.data import urls
from infd.data.loader import build_loader
from tests.images import jpeg_bytes, noise_image
from tests.s3_server import CuttingProxy, MotoServer, use_endpoint
from tests.test_loader import data_cfg, small_shards


@pytest.fixture
def s3(monkeypatch, tmp_path):
    server = MotoServer()
    use_endpoint(monkeypatch, server.url)
    monkeypatch.setenv("INFD_INDEX_CACHE", str(tmp_path / "index_cache"))
    monkeypatch.setattr(urls, "S3_RETRIES", 2)
    monkeypatch.setattr(urls, "S3_BACKOFF", 0.05)
    boto3.client("s3").create_bucket(Bucket="bucket")
    yield server
    server.stop()


@pytest.mark.slow
def test_s3_shards_give_the_same_samples_as_local_ones(tmp_path, s3):
    from tests.images import build

    sizes = [(220, 210) if i % 6 == 0 else (40 + i % 50, 48) for i in range(48)]
    local = small_shards(tmp_path, sizes, per_shard=10, hr_threshold=200)
    build(tmp_path / "shards_src", "s3://bucket/sets/a", "--samples-per-shard", "10", "--min-side", "32",
          "--hr-threshold", "200", "--no-verify")
    keys = sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="bucket")["Contents"])
    assert "sets/a/index.json" in keys and "sets/a/shard-000004.tar" in keys
    # S3's defaults (the node order, read through the node shard cache) against the node order on local
    # files, and S3 read per sample against local files' defaults (the global order).
    settings = (({"order": "node"}, {}), ({}, {"order": "global", "read_mode": "sample"}))
    for p_hr, (local_kw, s3_kw) in itertools.product((0.0, 0.4), settings):
        a = list(build_loader(data_cfg(local, p_hr=p_hr, **local_kw)).epoch_batches())
        b = list(build_loader(data_cfg("s3://bucket/sets/a/", p_hr=p_hr, **s3_kw)).epoch_batches())
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x.keys == y.keys and torch.equal(x.gt, y.gt) and torch.equal(x.enc, y.enc)


def test_an_s3_index_is_copied_once_per_node_and_again_when_rebuilt(tmp_path, s3):
    import json

    from infd.data.sample_index import open_index
    from tests.images import build, write_folder

    write_folder(tmp_path / "src", [(300, 300), (1200, 900), (500, 400)])
    build(tmp_path / "src", "s3://bucket/ix", "--samples-per-shard", "2")
    first = open_index("s3://bucket/ix")
    stamps = {p.name: p.stat().st_mtime_ns for p in first.root.iterdir()}
    again = open_index("s3://bucket/ix")  # another process of the node: maps the same copy
    assert again.root == first.root and {p.name: p.stat().st_mtime_ns for p in again.root.iterdir()} == stamps
    assert first.root.parent == tmp_path / "index_cache" and len(first.hr_ids) == 1
    assert first.key(int(first.hr_id(0))) == "000000001"
    # The index is rebuilt on S3 (here: its metadata changes): the next open copies it anew.
    meta = json.loads((first.root / "index.json").read_text()) | {"note": "rebuilt"}
    boto3.client("s3").put_object(Bucket="bucket", Key="ix/index.json", Body=json.dumps(meta).encode())
    rebuilt = open_index("s3://bucket/ix")
    assert rebuilt.root != first.root and rebuilt.meta["note"] == "rebuilt"


def test_s3_build_resumes_from_finished_shards(tmp_path, s3):
    from tests.images import build, write_folder

    write_folder(tmp_path / "src", [(300, 300)] * 5)
    build(tmp_path / "src", "s3://bucket/r", "--samples-per-shard", "2")
    client = boto3.client("s3")
    client.delete_object(Bucket="bucket", Key="r/shard-000001.json")
    before = client.head_object(Bucket="bucket", Key="r/shard-000000.tar")["LastModified"]
    index = build(tmp_path / "src", "s3://bucket/r", "--samples-per-shard", "2")
    assert client.head_object(Bucket="bucket", Key="r/shard-000000.tar")["LastModified"] == before
    assert index["total_samples"] == 5


def test_a_cut_connection_resumes_at_the_byte_reached(tmp_path, s3, monkeypatch):
    payload = np.random.default_rng(0).bytes(3 << 20)
    boto3.client("s3").put_object(Bucket="bucket", Key="big.bin", Body=payload)
    proxy = CuttingProxy(s3.port, cut_after=300_000)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    with urls.open_stream("s3://bucket/big.bin") as f:
        data = f.read()
    proxy.close()
    assert data == payload
    assert proxy.connections >= 2  # the first was cut, the read went on from where it stopped


@pytest.mark.slow
def test_server_gone_mid_epoch_retries_then_fails_clearly(tmp_path, s3):
    from tests.images import build

    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"{i:03d}.jpg").write_bytes(jpeg_bytes(noise_image(64, 64, i)))
    build(src, "s3://bucket/gone", "--samples-per-shard", "5", "--min-side", "32", "--no-verify")
    loader = build_loader(data_cfg("s3://bucket/gone/", num_workers=0, batch_size=2))
    it = iter(loader)
    next(it)
    s3.stop()
    with pytest.raises(urls.ShardReadError, match=r"s3://bucket/gone/shard-0000\d\d\.tar.*after 2 retries"):
        for _ in it:
            pass


def test_index_files_are_streamed_to_disk_in_flat_memory_and_a_cut_copy_continues(tmp_path, s3):
    """copy_to_file (how a node copies an s3:// index): Python's peak allocation while copying does not grow
    with the object (8 and 96 MB objects: both within 5 chunks, about 34 MB measured: botocore's buffers of a
    chunk and the chunk itself); a copy cut short continues from its bytes."""
    import tracemalloc

    client = boto3.client("s3")
    rng = np.random.default_rng(0)
    peaks = {}
    for mb in (8, 96):
        body = rng.integers(0, 256, mb << 20, dtype=np.uint8).tobytes()
        client.put_object(Bucket="bucket", Key=f"ix/samples{mb}.npy", Body=body)
        dest = tmp_path / f"copy{mb}"
        tracemalloc.start()
        urls.copy_to_file(f"s3://bucket/ix/samples{mb}.npy", dest)
        peaks[mb] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert dest.read_bytes() == body
    assert max(peaks.values()) < 5 * urls.COPY_CHUNK, peaks
    assert peaks[96] < 1.5 * peaks[8], peaks  # flat in the object's size
    partial = tmp_path / "partial"
    partial.write_bytes(body[:5_000_000])  # a copy killed after 5 MB
    urls.copy_to_file("s3://bucket/ix/samples96.npy", partial)
    assert partial.read_bytes() == body
