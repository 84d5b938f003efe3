"""Encode image shards into a latent cache for stage 2.

    python -m data_prep.encode_latents --ae EXPORT --shards SPEC --output DST [--index DIR] [--flip]
        [--batch-size 16] [--workers 4] [--text-model ViT-B-32 --text-pretrained TAG|PATH|none]
    torchrun --nproc_per_node 8 -m data_prep.encode_latents ...     # each rank its own shards

SPEC: brace patterns, directories or s3:// prefixes. Their sample index (--index; default beside
the shards, as the loader's data.index; data_prep.build_shards writes one, for other shards run
python -m data_prep.index_shards SHARDS --output DIR) gives each shard's sample count (the
progress bar) and the samples without a readable image, which are skipped without a decode.
DST: a directory or s3://bucket/prefix (tars are written to a local temporary directory, then
uploaded).

Output shard i holds input shard i: per sample KEY.latent.npy (fp16 pre-quantisation latent of the
image's centre square at the autoencoder's input size), KEY.latent_flip.npy (--flip),
KEY.text.npy (with a text model) and KEY.json (caption, size). A shard is finished once its
stats file latents-XXXXXX.json exists (written after the tar is in place or uploaded), so a rerun
keeps finished shards and redoes partial ones; the cache's own index is written last by rank 0.

Images are decoded in DataLoader workers (--workers, each reading whole shards), a JPEG at the
smallest DCT scale that keeps DECODE_OVERSAMPLE x the input size across the square (the loader's
rule for its encoder input); the main process encodes batches and writes the tars. A stop signal
(SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2) ends the run after the batch in progress: finished
shards stay, open ones are dropped, exit 0; the same command continues. The workers ignore these
signals (infd/data/workers.py).
"""
from __future__ import annotations

import argparse
import itertools
import io
import json
import os
import shutil
import signal
import sys
import tarfile

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from data_prep.build_shards import Destination
from data_prep.index_shards import build_index
from infd.cli.common import HelpFormatter
from infd.config import ConfigError
from infd.data.decode import SkipSample
from infd.data.latents import npy_bytes
from infd.data.sample_index import FILES, INDEX_NAME, SampleIndex, open_index
from infd.data.tar_samples import TruncatedShard, image_bytes, iterate_tar
from infd.data.transforms import centre_encoder_input, to_unit_range
from infd.data.urls import dirname_url, expand_urls, join_url, open_stream
from infd.data.workers import init_worker, preemption_signals_held
from infd.export import load_export
from infd.utils.process_main import run_as_process
from infd.utils.signals import PreemptionFlag


def shard_name(i: int) -> str:
    return f"latents-{i:06d}"


def count(skipped: dict, reason: str) -> None:
    skipped[reason] = skipped.get(reason, 0) + 1


def read_images(url: str, wanted: np.ndarray, size: int, skipped: dict):
    """(key, image (3, size, size) uint8, metadata) of the samples of a shard that `wanted` (bool per
    sample, in tar order: the index's) keeps; the others are counted as excluded_by_index, not decoded."""
    stream = open_stream(url)
    try:
        for j, raw in enumerate(iterate_tar(stream)):
            if j >= len(wanted):
                raise ConfigError(f"{url} holds more samples than its index records ({len(wanted)}): the shards "
                                  "changed after indexing; index them again (python -m data_prep.index_shards)")
            if not wanted[j]:
                count(skipped, "excluded_by_index")
                continue
            try:
                img = centre_encoder_input(image_bytes(raw), size)
            except SkipSample as err:
                count(skipped, err.reason)
                continue
            meta = json.loads(raw["json"]) if "json" in raw else {}
            yield raw["__key__"], torch.from_numpy(np.array(img)).permute(2, 0, 1), meta
    except TruncatedShard:
        count(skipped, "truncated_shard")
    finally:
        stream.close()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


class ShardImages(IterableDataset):
    """Decoded images of whole shards, for DataLoader workers: worker w of n takes shards w, w+n, ...
    of `shards` [(output index, url, id in `index`)]. Yields, per shard in order, chunks {"shard",
    "keys", "images" (B, 3, S, S) uint8, "metas"} of up to batch_size, then {"shard", "done":
    True, "url", "skipped"}."""

    def __init__(self, shards: list[tuple[int, str, int]], index: SampleIndex, size: int, batch_size: int):
        self.shards, self.index, self.size, self.batch_size = shards, index, size, batch_size

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        for i, url, shard_id in self.shards[worker::n_workers]:
            skipped, chunk = {}, []
            wanted = self.index.in_main_stream(shard_id, exclude_hr=False)
            for item in itertools.chain(read_images(url, wanted, self.size, skipped), [None]):
                if item is not None:
                    chunk.append(item)
                if chunk and (item is None or len(chunk) == self.batch_size):
                    yield {"shard": i, "keys": [c[0] for c in chunk], "images": torch.stack([c[1] for c in chunk]),
                           "metas": [c[2] for c in chunk], "done": False}
                    chunk = []
            yield {"shard": i, "done": True, "url": url, "skipped": skipped}


class ShardWriter:
    """The output tar of one shard: written under .tmp in the destination's local directory and
    renamed when complete, then published (S3: uploaded) before its stats file."""

    def __init__(self, dest: Destination, i: int):
        self.dest, self.name, self.count = dest, shard_name(i), 0
        self.tmp = dest.local / f"{self.name}.tar.tmp"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)

    def finish(self, url: str, skipped: dict) -> dict:
        self.tar.close()
        final = self.dest.local / f"{self.name}.tar"
        os.replace(self.tmp, final)
        stats = {"name": final.name, "samples": self.count, "hr": 0, "bytes": final.stat().st_size, "source": url,
                 "skipped": skipped}
        self.dest.publish(final.name)
        (self.dest.local / f"{self.name}.json").write_text(json.dumps(stats))
        self.dest.publish(f"{self.name}.json")  # last: marks the shard finished
        return stats

    def drop(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


@torch.no_grad()
def encode_shards(shards: list[tuple[int, str, int]], index: SampleIndex, dest: Destination, ae, text, args, device,
                  preempt: PreemptionFlag, desc: str) -> int:
    """Encode `shards` [(output index, url, id in `index`)] into `dest`; returns how many were
    finished (fewer after a stop signal)."""
    dataset = ShardImages(shards, index, ae.cfg.net.resolution, args.batch_size)
    loader = DataLoader(dataset, batch_size=None, num_workers=args.workers, worker_init_fn=init_worker,
                        prefetch_factor=2 if args.workers > 0 else None)
    expected = {i: index.main_count(shard_id, exclude_hr=False) for i, _, shard_id in shards}
    writers: dict[int, ShardWriter] = {}
    finished = 0
    with preemption_signals_held():
        items = iter(loader)
    try:
        with tqdm(total=sum(expected.values()), desc=desc, unit="image") as bar:
            for item in _until_stopped(items, preempt):
                shard = item["shard"]
                if shard not in writers:
                    writers[shard] = ShardWriter(dest, shard)
                writer = writers[shard]
                if item["done"]:
                    writers.pop(shard).finish(item["url"], item["skipped"])
                    finished += 1
                    bar.update(expected[shard] - writer.count)  # the ones that failed to decode
                    bar.set_postfix(shards=f"{finished}/{len(shards)}")
                    continue
                batch = list(zip(item["keys"], item["images"], item["metas"]))
                writer.count += write_batch(writer.tar, batch, ae, text, args.flip, device)
                bar.update(len(batch))
    finally:
        del items  # stops the workers
        for writer in writers.values():  # shards left open by a stop: redone by the next run
            writer.drop()
    return finished


def _until_stopped(items, preempt: PreemptionFlag):
    """The loader's items until a stop signal (checked between batches)."""
    while not preempt.raised:
        try:
            yield next(items)
        except StopIteration:
            return
        except Exception:
            if not preempt.raised:
                raise
            return  # a worker died after the signal: what is finished is kept


def write_batch(tar, batch, ae, text, flip: bool, device) -> int:
    x = to_unit_range(torch.stack([b[1] for b in batch]).to(device))  # uint8 until here: 4x less to move
    z = ae.encode(x).half().cpu().numpy()
    z_flip = ae.encode(x.flip(-1)).half().cpu().numpy() if flip else None
    captions = [b[2].get("caption") or "" for b in batch]
    emb = text(captions).half().cpu().numpy() if text is not None else None
    for j, (key, _, meta) in enumerate(batch):
        add_member(tar, f"{key}.latent.npy", npy_bytes(z[j]))
        if z_flip is not None:
            add_member(tar, f"{key}.latent_flip.npy", npy_bytes(z_flip[j]))
        if emb is not None:
            add_member(tar, f"{key}.text.npy", npy_bytes(emb[j]))
        source = meta.get("meta") or {}  # the source's own metadata, as build_shards stored it
        label = meta.get("label", source.get("label"))
        record = {"key": key, "caption": captions[j], "label": label, "width": meta.get("width"),
                  "height": meta.get("height")}
        add_member(tar, f"{key}.json", json.dumps(record).encode())
    return len(batch)


def source_index(index: str | None, urls: list[str]) -> SampleIndex:
    """The input shards' index (--index, default beside the shards, as the loader's data.index)."""
    url = index or dirname_url(urls[0])
    url = dirname_url(url) if url.endswith(INDEX_NAME) else url
    try:
        return open_index(url)
    except FileNotFoundError:
        raise ConfigError(f"no shard index at {url}: index the shards with python -m data_prep.index_shards SHARDS "
                          "--output DIR and pass --index DIR (data_prep.build_shards writes one)") from None


def index_ids(index: SampleIndex, urls: list[str]) -> list[int]:
    """Each shard's id in the index (matched by tar name, as the loader does)."""
    ids = {name: i for i, name in enumerate(index.shard_names)}
    missing = [u for u in urls if u.rsplit("/", 1)[-1] not in ids]
    if missing:
        raise ConfigError(f"shard {missing[0]} is not in the index at {index.root} ({len(missing)} missing): "
                          "index the shards again (python -m data_prep.index_shards) or fix --shards/--index")
    return [ids[u.rsplit("/", 1)[-1]] for u in urls]


def write_index(dest: Destination, n: int, ae_path: str) -> dict:
    """The sample index of the cache (data_prep.index_shards' format, indexed by the latent member),
    published with index.json last (it marks the index complete)."""
    urls = [join_url(dest.url, f"{shard_name(i)}.tar") for i in range(n)]
    meta = build_index(urls, dest.local, hr_threshold=1 << 30, workers=1, primary=("latent.npy",),
                       extra_meta={"kind": "latents", "autoencoder": ae_path}, desc="index the cache")
    for name in (*FILES[1:], FILES[0]):
        dest.publish(name)
    return meta


def load_text_encoder(args, device):
    if not args.text_model:
        return None
    from infd.text import TextEncoderConfig, build_text_encoder

    pretrained = None if args.text_pretrained == "none" else args.text_pretrained
    cfg = TextEncoderConfig(kind="openclip", model=args.text_model, pretrained=pretrained)
    return build_text_encoder(cfg).to(device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.encode_latents", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--ae", required=True, help="autoencoder export directory")
    p.add_argument("--shards", required=True, nargs="+", help="image shards (patterns, directories, s3://)")
    p.add_argument("--index", help="the shards' index directory (default: beside the shards)")
    p.add_argument("--output", required=True, help="directory or s3://bucket/prefix")
    p.add_argument("--batch-size", type=int, default=16, help="images per encoder batch")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers decoding images (0: in this process)")
    p.add_argument("--flip", action="store_true", help="also store the latent of the mirrored image")
    p.add_argument("--text-model", help="OpenCLIP model for cached text embeddings (e.g. ViT-B-32); none: no text")
    p.add_argument("--text-pretrained", default="laion2b_s34b_b79k", help="tag, file, or none (random init: tests)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    preempt = PreemptionFlag()
    try:
        return run(args, preempt)
    except ConfigError as err:
        print(f"encode_latents: error: {err}", file=sys.stderr)
        return 2


def run(args, preempt: PreemptionFlag) -> int:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    urls = expand_urls(args.shards)
    if not urls:
        raise ConfigError(f"--shards {args.shards} matches no shard")
    index = source_index(args.index, urls)
    ids = index_ids(index, urls)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    ae, text = load_export(args.ae, device)[0], load_text_encoder(args, device)
    dest = Destination(args.output)
    try:
        mine = [(i, u, ids[i]) for i, u in enumerate(urls)
                if i % world == rank and not dest.exists(f"{shard_name(i)}.json")]
        finished = encode_shards(mine, index, dest, ae, text, args, device, preempt, f"encode latents (rank {rank})")
        if preempt.raised:
            print(f"rank {rank}: stopped by {signal.Signals(preempt.signum).name} with {finished} of {len(mine)} "
                  "shards finished; the same command continues", flush=True)
        else:
            if world > 1:
                dist.barrier()
            if rank == 0:
                meta = write_index(dest, len(urls), str(args.ae))
                print(f"latent cache: {meta['total_samples']} samples in {len(urls)} shards -> {args.output}",
                      flush=True)
    finally:
        if dest.is_s3:
            shutil.rmtree(dest.local, ignore_errors=True)  # the staging directory
    if world > 1:
        if not preempt.raised:
            dist.barrier()  # the other ranks wait for the index
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_as_process(main))
