"""Encode image shards into a latent cache for stage 2.

    python -m data_prep.encode_latents --ae EXPORT --shards SPEC --output DST [--flip]
        [--batch-size 16] [--workers 4] [--text-model ViT-B-32 --text-pretrained TAG|PATH|none]
    torchrun --nproc_per_node 8 -m data_prep.encode_latents ...     # each rank its own shards

Output shard i holds input shard i: per sample KEY.latent.npy (fp16 pre-quantisation latent of the
image's centre square at the autoencoder's input size), KEY.latent_flip.npy (--flip),
KEY.text.npy (with a text model) and KEY.json (caption, size). A shard is finished once its
stats file latents-XXXXXX.json exists (written after the tar is renamed into place), so a rerun
keeps finished shards and redoes partial ones; index.json is written last by rank 0.

Images are decoded in DataLoader workers (--workers, each reading whole shards); the main process
encodes batches and writes the tars. A stop signal (SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2)
ends the run after the batch in progress: finished shards stay, open ones are dropped, exit 0;
the same command continues. The workers ignore these signals (infd/data/workers.py).
"""
from __future__ import annotations

import argparse
import itertools
import io
import json
import os
import signal
import sys
import tarfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from data_prep.index_shards import build_index
from infd.data.tar_samples import image_bytes
from infd.data.decode import SkipSample, decode_rgb, open_image
from infd.data.latents import npy_bytes
from infd.data.tar_samples import TruncatedShard, iterate_tar
from infd.data.urls import expand_urls, open_stream
from infd.data.workers import init_worker, preemption_signals_held
from infd.evaluate import centre_square
from infd.export import load_model
from infd.image import pil_to_tensor, resize_antialiased
from train.signals import PreemptionFlag


def shard_name(i: int) -> str:
    return f"latents-{i:06d}"


def read_images(url: str, size: int, skipped: dict):
    stream = open_stream(url)
    try:
        for raw in iterate_tar(stream):
            try:
                img = centre_square(decode_rgb(open_image(image_bytes(raw))))
            except SkipSample as err:
                skipped[err.reason] = skipped.get(err.reason, 0) + 1
                continue
            meta = json.loads(raw["json"]) if "json" in raw else {}
            yield raw["__key__"], pil_to_tensor(resize_antialiased(img, (size, size))), meta
    except TruncatedShard:
        skipped["truncated_shard"] = skipped.get("truncated_shard", 0) + 1
    finally:
        stream.close()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


class ShardImages(IterableDataset):
    """Decoded images of whole shards, for DataLoader workers: worker w of n takes shards w, w+n, ...
    of `shards` [(index, url)]. Yields, per shard in order, chunks {"shard", "keys", "images"
    (B, 3, S, S) in [-1, 1], "metas"} of up to batch_size, then {"shard", "done": True, "url",
    "skipped"}."""

    def __init__(self, shards: list[tuple[int, str]], size: int, batch_size: int):
        self.shards, self.size, self.batch_size = shards, size, batch_size

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        for i, url in self.shards[worker::n_workers]:
            skipped, chunk = {}, []
            for item in itertools.chain(read_images(url, self.size, skipped), [None]):
                if item is not None:
                    chunk.append(item)
                if chunk and (item is None or len(chunk) == self.batch_size):
                    yield {"shard": i, "keys": [c[0] for c in chunk], "images": torch.stack([c[1] for c in chunk]),
                           "metas": [c[2] for c in chunk], "done": False}
                    chunk = []
            yield {"shard": i, "done": True, "url": url, "skipped": skipped}


class ShardWriter:
    """The output tar of one shard, written under .tmp and renamed when complete."""

    def __init__(self, out: Path, i: int):
        self.out, self.i, self.count = out, i, 0
        self.tmp = out / f"{shard_name(i)}.tar.tmp"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)

    def finish(self, url: str, skipped: dict) -> dict:
        self.tar.close()
        final = self.out / f"{shard_name(self.i)}.tar"
        os.replace(self.tmp, final)
        stats = {"name": final.name, "samples": self.count, "hr": 0, "bytes": final.stat().st_size, "source": url,
                 "skipped": skipped}
        (self.out / f"{shard_name(self.i)}.json").write_text(json.dumps(stats))  # marks the shard finished
        return stats

    def drop(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


@torch.no_grad()
def encode_shards(shards: list[tuple[int, str]], out: Path, ae, text, args, device, preempt: PreemptionFlag,
                  desc: str) -> int:
    """Encode `shards` into `out`; returns how many were finished (fewer after a stop signal)."""
    dataset = ShardImages(shards, ae.cfg.net.resolution, args.batch_size)
    loader = DataLoader(dataset, batch_size=None, num_workers=args.workers, worker_init_fn=init_worker,
                        prefetch_factor=2 if args.workers > 0 else None)
    writers: dict[int, ShardWriter] = {}
    finished = 0
    with preemption_signals_held():
        items = iter(loader)
    try:
        with tqdm(total=len(shards), desc=desc, unit="shard") as bar:
            for item in _until_stopped(items, preempt):
                writer = writers.get(item["shard"]) or writers.setdefault(item["shard"], ShardWriter(out, item["shard"]))
                if item["done"]:
                    writers.pop(item["shard"]).finish(item["url"], item["skipped"])
                    finished += 1
                    bar.update()
                    continue
                batch = list(zip(item["keys"], item["images"], item["metas"]))
                writer.count += write_batch(writer.tar, batch, ae, text, args.flip, device)
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
    x = torch.stack([b[1] for b in batch]).to(device)
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


def write_index(out: Path, n: int, ae_path: str) -> dict:
    """The sample index of the cache (data_prep.index_shards' format, indexed by the latent member)."""
    urls = [str(out / f"{shard_name(i)}.tar") for i in range(n)]
    return build_index(urls, out, hr_threshold=1 << 30, workers=1, primary=("latent.npy",),
                       extra_meta={"kind": "latents", "autoencoder": ae_path}, desc="index the cache")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ae", required=True, help="autoencoder export directory")
    p.add_argument("--shards", required=True, nargs="+", help="image shards (patterns, directories, s3://)")
    p.add_argument("--output", required=True, help="local directory")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers decoding images (0: in this process)")
    p.add_argument("--flip", action="store_true", help="also store the latent of the mirrored image")
    p.add_argument("--text-model", help="OpenCLIP model for cached text embeddings (e.g. ViT-B-32)")
    p.add_argument("--text-pretrained", default="laion2b_s34b_b79k", help="tag, file, or none (random init: tests)")
    p.add_argument("--device")
    args = p.parse_args(argv)
    preempt = PreemptionFlag()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    ae = load_model(args.ae, device)
    text = None
    if args.text_model:
        from infd.text import TextEncoderConfig, build_text_encoder

        pretrained = None if args.text_pretrained == "none" else args.text_pretrained
        text = build_text_encoder(TextEncoderConfig(kind="openclip", model=args.text_model, pretrained=pretrained))
        text = text.to(device)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    urls = expand_urls(args.shards)
    mine = [(i, u) for i, u in enumerate(urls) if i % world == rank and not (out / f"{shard_name(i)}.json").exists()]
    finished = encode_shards(mine, out, ae, text, args, device, preempt, f"encode latents (rank {rank})")
    if preempt.raised:
        print(f"rank {rank}: stopped by {signal.Signals(preempt.signum).name} with {finished} of {len(mine)} shards "
              "finished; the same command continues", flush=True)
        if world > 1:
            dist.destroy_process_group()
        return 0
    if world > 1:
        dist.barrier()
    if rank == 0:
        index = write_index(out, len(urls), str(args.ae))
        print(f"latent cache: {index['total_samples']} samples in {len(urls)} shards -> {out}", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
