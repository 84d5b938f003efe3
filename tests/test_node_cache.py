"""The node shard cache (data.loader.read_mode=shard_cache, infd/data/shard_cache.py) on a real S3 server
(moto_server), with the GETs counted by a proxy in front of it: fills shared by a node's processes, the
bound and eviction, the cache model of benchmarks/data_at_scale.py against a real 2-rank read, and a
two-node training run stopped by SIGTERM and resumed at one rank."""
import json
import multiprocessing
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from infd.data import shard_cache
from infd.data.cache_model import simulate
from infd.data.loader import Loader, build_loader
from infd.data.orders import epoch_order
from infd.data.shard_cache import CacheOptions, ShardCache
from infd.data.shard_source import ShardSource
from infd.data.urls import ReadOptions, read_range
from tests.images import build, write_folder
from tests.s3_server import CountingProxy, free_port
from tests.test_loader import data_cfg
from tests.test_s3 import s3  # noqa: F401  (fixture)
from tests.training import ROOT, env, metrics, run, sample_keys, wait_for_step

AE = "train.autoencoder"
# GETs are counted: no hedging, whose second GET for a reply slower than 0.3 s (a busy CI machine) counts too.
UNHEDGED = ReadOptions(0.0, 30.0)


def _shards_on_s3(tmp_path, n: int = 36, per_shard: int = 6) -> str:
    """n images (1 in 5 of 128 px long side: the high-res set) in shards of per_shard on s3://bucket/n/."""
    write_folder(tmp_path / "src", [(96 + 8 * (i % 5), 112) for i in range(n)], captions=False)
    build(tmp_path / "src", "s3://bucket/n", "--min-side", "64", "--samples-per-shard", str(per_shard),
          "--hr-threshold", "125", "--no-verify")
    return "s3://bucket/n/"


@pytest.fixture
def counted(s3, monkeypatch):  # noqa: F811
    """GETs go through a counting proxy from here on (the shards are built before)."""
    proxy = CountingProxy(s3.port)
    yield proxy, lambda: monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    proxy.close()


def _spans(url: str) -> list[tuple[str, int, int, int]]:
    """(shard URL, shard bytes, offset, length) of every sample's read, in index order."""
    source = ShardSource(data_cfg(url, read_mode="sample"), None, None)
    out = []
    for sid in range(len(source.index.samples)):
        shard, start, end = source.span(sid)
        if start >= 0:
            out.append((source.url_of[shard], int(source.index.shards[shard]["bytes"]), start, end - start))
    return out


def _read_all(root: str, chunk: int, limit: int, spans: list, reverse: bool) -> list[bytes]:
    """Every span through a cache at `root`, on 4 threads (a loader worker's read pool), in one process."""
    cache = ShardCache(CacheOptions(Path(root), limit, chunk), UNHEDGED)
    order = list(reversed(spans)) if reverse else spans
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda s: cache.read(*s), order))
    return list(reversed(got)) if reverse else got


def test_a_nodes_processes_fill_each_chunk_once_evict_past_the_limit_and_reuse_what_is_there(tmp_path, counted):
    url = _shards_on_s3(tmp_path, n=24)
    proxy, use_proxy = counted
    use_proxy()
    spans = _spans(url)
    expected = [read_range(u, off, n, UNHEDGED) for u, _, off, n in spans]
    direct = proxy.tar_gets()
    assert direct == len(spans)  # sample mode: one GET per sample

    # Two processes of one node (2 x 4 threads, opposite orders) through one cache folder with chunks
    # smaller than a shard (reads cross chunk boundaries): each chunk is fetched once, whoever needs it first.
    chunk = 4096
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_read_all, [(str(tmp_path / "node"), chunk, 1 << 30, spans, r) for r in (False, True)])
    assert results[0] == results[1] == expected
    shard_sizes = {u: b for u, b, _, _ in spans}
    chunks = sum(-(-b // chunk) for b in shard_sizes.values())
    fills = proxy.gets[direct:]
    assert len(fills) == len(set(fills)) == chunks, (len(fills), chunks)
    assert all(r.startswith("bytes=") for _, r in fills)

    # A small bound: eviction happens, what stays fits the limit, and the reads are still right. A fill's
    # temporary file left by a process that died is removed by the eviction pass.
    limit = 3 * chunk
    small = tmp_path / "small"
    orphan = small / "orphan" / "000000.4194305.1.tmp"  # above Linux's largest pid_max
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x" * 100)
    before = dict(shard_cache.CACHE)
    assert _read_all(str(small), chunk, limit, spans, False) == expected
    assert shard_cache.CACHE["evicted"] > before["evicted"]
    held = [p for p in small.glob("*/*") if p.name.isdigit()]
    assert 0 < sum(p.stat().st_size for p in held) <= limit
    assert not orphan.exists()

    # What the cache holds is read without a GET (a restarted job on the node): 100 bytes of a held chunk.
    cache = ShardCache(CacheOptions(small, limit, chunk), ReadOptions())
    held_chunks = [(u, b, c) for u, b in shard_sizes.items() for c in range(-(-b // chunk))
                   if cache.chunk_path(u, b, c).exists()]
    assert held_chunks
    u, b, c = held_chunks[0]
    gets = proxy.tar_gets()
    direct = read_range(u, c * chunk, 100, UNHEDGED)
    assert _read_all(str(small), chunk, limit, [(u, b, c * chunk, 100)], False) == [direct]
    assert proxy.tar_gets() == gets + 1  # the direct read only


def test_the_cache_model_predicts_a_two_rank_read_with_four_canonical_nodes(tmp_path, counted):
    """benchmarks/data_at_scale.py's shard-cache figures come from the loader's order and the cache model
    (infd/data/cache_model.py); here both predict a real epoch of 2 ranks (2 nodes of 1 rank) with 4
    canonical nodes on the S3 server: GETs, bytes and distinct shards per global batch within 10%."""
    url = _shards_on_s3(tmp_path, n=48)
    proxy, use_proxy = counted
    use_proxy()
    kw = dict(p_hr=0.5, canonical_nodes=4, hedge_after_s=0.0, batch_size=4, cache_chunk_mb=1)
    real_gets = real_bytes = 0
    real_shards: dict[int, set] = {}
    for rank in (0, 1):  # node `rank` with its own cache folder
        loader = build_loader(data_cfg(url, cache_dir=str(tmp_path / f"node{rank}"), **kw), rank, 2)
        assert loader.cfg.order == "node"  # the default for s3://
        gets_before = proxy.tar_gets()
        for k, batch in enumerate(loader.epoch_batches()):
            real_shards.setdefault(k, set()).update(key_shard(loader.source, key) for key in batch.keys)
        real_gets += sum(r["reads"] for r in loader.reads.values())
        real_bytes += loader.bytes_read()
        assert proxy.tar_gets() - gets_before >= sum(r["reads"] for r in loader.reads.values())

    cfg = data_cfg(url, **kw)
    source = ShardSource(cfg, None, None)
    loader = Loader(source, cfg, 0, 2)
    order = epoch_order(source, loader.cfg, 0, loader.global_batch)
    pred_gets = pred_bytes = 0
    pred_shards = []
    for node in (0, 1):
        reads = []
        for k in range(loader.batches_per_epoch):
            ids = [next(order.hr_picks(g) if order.is_hr(g) else order.main_picks(g))
                   for g in order.rank_slots(k * loader.global_batch, node, 2, 1)]
            reads += [source.span(i) for i in ids]
            if node == 0:
                pred_shards.append(set())
            pred_shards[k].update(int(source.index.samples["shard"][i]) for i in ids)
        figures = simulate(reads, source.index.shards["bytes"], 1 << 20, int(cfg.cache_gb * 1e9))
        pred_gets, pred_bytes = pred_gets + figures.gets, pred_bytes + figures.get_bytes
    assert len(real_shards) == len(pred_shards) == loader.batches_per_epoch
    real_mean = np.mean([len(s) for s in real_shards.values()])
    pred_mean = np.mean([len(s) for s in pred_shards])
    for name, real, pred in (("gets", real_gets, pred_gets), ("bytes", real_bytes, pred_bytes),
                             ("shards per batch", real_mean, pred_mean)):
        assert abs(real - pred) <= 0.1 * pred, (name, real, pred)


def key_shard(source: ShardSource, key: str) -> int:
    """The index's shard id of a sample key (the key table is small here)."""
    keys = [source.index.key(i) for i in range(len(source.index.samples))]
    return int(source.index.samples["shard"][keys.index(key)])


def _cached_shards(source: ShardSource, folder: Path) -> set[int]:
    """Shards (index ids) with a chunk in a node's cache folder."""
    cache = ShardCache(CacheOptions(folder, 1, 1 << 20), ReadOptions())
    return {shard for shard, url in source.url_of.items()
            if cache.chunk_path(url, int(source.index.shards[shard]["bytes"]), 0).exists()}


@pytest.mark.slow
def test_two_nodes_stopped_by_sigterm_resume_at_one_rank_each_sample_once_reusing_the_cache(tmp_path, counted):
    """Two nodes on this host (cluster/torchrun/multinode.sh twice, 1 rank and 2 loader workers each, their
    own cache folders, a cache bound smaller than what a node reads: eviction happens), SIGTERM to both
    launchers mid-epoch, resumed at 1 rank (the global batch kept) on node 0's cache folder."""
    url = _shards_on_s3(tmp_path)
    proxy, use_proxy = counted
    use_proxy()
    limit_gb = 5e-5  # 50 KB: about one shard of the ~4 a node reads
    common = ("experiment=ae_cpu_tiny", "trainer.image_every=1000", "trainer.log_every=1", "data.kind=shards",
              f"data.loader.shards={url}", "data.loader.num_workers=2", "data.loader.patch.r_max=96",
              "data.loader.p_hr=0.5", "data.loader.hedge_after_s=0", "trainer.ckpt_every=100",
              "trainer.sample_log=true")
    source = ShardSource(data_cfg(url, p_hr=0.5), None, None)
    epoch = Loader(source, data_cfg(url, p_hr=0.5, batch_size=2), 0, 2).batches_per_epoch
    steps = (*common, f"trainer.max_steps={epoch}")
    port, nodes = str(free_port()), [tmp_path / "node0", tmp_path / "node1"]
    procs = [subprocess.Popen(["bash", "cluster/torchrun/multinode.sh", "run.name=run", *steps,
                               "data.loader.batch_size=2", f"data.loader.cache_gb={limit_gb}"], cwd=ROOT,
                              env=env(NNODES="2", NODE_RANK=str(n), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port, RDZV_ID="cache", MAX_RESTARTS="0", PYTHON=sys.executable,
                                      RUN_ROOT=str(tmp_path), INFD_SHARD_CACHE=str(nodes[n])),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    seen = wait_for_step(tmp_path / "run" / "metrics.jsonl", 4, procs[0])
    assert seen < epoch - 2
    for proc in procs:  # each node's launcher gets the signal, as a scheduler delivers it
        proc.send_signal(signal.SIGTERM)
    outs = [proc.communicate(timeout=180)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [143, 143], "\n".join(o[-3000:] for o in outs)
    stop = len(metrics(tmp_path, "run"))
    assert stop < epoch

    # Node 0 read more distinct shard bytes than its bound, yet holds no more than the bound.
    node0_reads = {key_shard(source, k) for step, keys in _rank_keys(tmp_path / "run", 0).items() for k in keys}
    held = [p for p in nodes[0].glob("*/*") if p.name.isdigit()]
    assert sum(p.stat().st_size for p in held) <= limit_gb * 1e9 < sum(
        int(source.index.shards[s]["bytes"]) for s in node0_reads)

    cached = _cached_shards(source, nodes[0])
    gets_before = len(proxy.gets)
    res = run(AE, tmp_path, "run", *steps, "data.loader.batch_size=4", nproc=1, INFD_SHARD_CACHE=str(nodes[0]),
              AWS_ENDPOINT_URL=proxy.url)
    resume_gets = proxy.gets[gets_before:]
    assert "resumed from" in res.stdout + res.stderr
    keys = sample_keys(tmp_path, "run")
    assert sorted(keys) == list(range(1, epoch + 1))

    # The same global batches as the order itself gives at 1 rank, and every main-stream sample once.
    reference = build_loader(data_cfg(url, p_hr=0.5, batch_size=4, canonical_nodes=2, read_mode="sample"))
    for step, batch in zip(range(1, epoch + 1), reference.epoch_batches()):
        assert sorted(keys[step]) == sorted(batch.keys), step
    hr = {source.index.key(int(i)) for i in source.index.hr_ids}
    main = [k for step in keys for k in keys[step] if k not in hr]
    assert len(main) == len(set(main)) > 0

    # The restart read shards node 0 had cached without fetching them: fewer GETs than a cold start,
    # which fetches every shard it reads.
    fetched = {path.rsplit("/", 1)[-1] for path, _ in resume_gets}
    resumed_reads = {key_shard(source, k) for step in range(stop + 1, epoch + 1) for k in keys[step]}
    reused = {s for s in resumed_reads & cached if source.url_of[s].rsplit("/", 1)[-1] not in fetched}
    assert reused, (resumed_reads, cached, fetched)
    assert len(resume_gets) < len(resumed_reads)


def _rank_keys(run_dir: Path, rank: int) -> dict[int, list[str]]:
    lines = (run_dir / "samples" / f"rank{rank:05d}.jsonl").read_text().splitlines()
    return {e["step"]: e["keys"] for e in map(json.loads, lines)}
