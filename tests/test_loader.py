import io
import itertools
import json
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infd.config import from_mapping
from data_prep.index_shards import build_index
from infd.data.loader import DataConfig, build_loader
from infd.data.transforms import PatchConfig, make_patch_sample, plan_patch
from tests.images import bomb_png, build, exif_rotated_jpeg, jpeg_bytes, noise_image, png_bytes, sixteen_bit_png

SMALL_PATCH = {"patch_size": 32, "r_max": 64, "encoder_size": 32}
SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).resolve().parents[1]


def small_shards(tmp_path, sizes, per_shard: int, hr_threshold: int = 100_000, name: str = "shards") -> Path:
    src = tmp_path / f"{name}_src"
    src.mkdir()
    for i, (w, h) in enumerate(sizes):
        (src / f"{i:05d}.jpg").write_bytes(jpeg_bytes(noise_image(w, h, i)))
    out = tmp_path / name
    build(src, str(out), "--samples-per-shard", str(per_shard), "--min-side", "32",
          "--hr-threshold", str(hr_threshold), "--no-verify")
    return out


def data_cfg(shards, **kw) -> DataConfig:
    raw = {"shards": shards if isinstance(shards, list) else str(shards), "batch_size": 4, "num_workers": 2,
           "patch": SMALL_PATCH}
    raw.update(kw)
    return from_mapping(DataConfig, raw)


@pytest.mark.slow
def test_every_sample_exactly_once_per_epoch_across_2_ranks_x_2_workers(tmp_path):
    shards = small_shards(tmp_path, [(40 + i % 30, 50) for i in range(64)], per_shard=13)
    out = tmp_path / "keys"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(SCRIPTS / "epoch_keys.py"), str(shards), str(out), "0,1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    all_keys = {f"{i:09d}" for i in range(64)}
    for epoch in ("0", "1"):
        batches = [r["epochs"][epoch] for r in ranks]
        assert len(batches[0]) == len(batches[1]) == ranks[0]["batches_per_epoch"] == 8
        seen = Counter(k for rank in batches for batch in rank for k in batch)
        assert set(seen) == all_keys and max(seen.values()) == 1
    order = lambda e: [k for b in ranks[0]["epochs"][e] for k in b]  # noqa: E731
    assert order("0") != order("1")  # reshuffled per epoch


def test_uneven_total_keeps_ranks_equal_and_never_repeats(tmp_path):
    shards = small_shards(tmp_path, [(48, 48)] * 70, per_shard=9)
    seen, counts = Counter(), []
    for rank in (0, 1):
        batches = list(build_loader(data_cfg(shards), rank, 2).epoch_batches())
        counts.append(len(batches))
        seen.update(k for b in batches for k in b.keys)
    assert counts[0] == counts[1] == 8  # 70 // (2 ranks x 4) global batches; the 6 left wait for another epoch
    assert max(seen.values()) == 1 and len(seen) == 64


def test_high_res_fraction_follows_p_hr(tmp_path):
    # 5% of images are high-res (long side >= 200); with p_hr = 0.5 half the samples must be.
    sizes = [(220, 210) if i % 20 == 0 else (40 + i % 50, 48) for i in range(200)]
    shards = small_shards(tmp_path, sizes, per_shard=50, hr_threshold=200)
    loader = build_loader(data_cfg(shards, p_hr=0.5, num_workers=2, batch_size=38))  # 380 slots: 10 batches
    hr, total, main = 0, 0, Counter()
    batches = iter(loader)
    for batch in itertools.islice(batches, 2 * loader.batches_per_epoch):  # two epochs
        widths = [int(k) for k in batch.keys]
        is_hr = [sizes[i][0] >= 200 for i in widths]
        assert batch.is_hr.tolist() == is_hr
        assert abs(sum(is_hr) - 19) <= 1  # every batch: p_hr x 38, up to one more or fewer
        hr, total = hr + sum(is_hr), total + len(widths)
        main.update(k for k, h in zip(batch.keys, is_hr) if not h)
    batches.close()
    assert abs(hr / total - 0.5) <= 0.01, hr / total
    assert len(main) == 190 and max(main.values()) == 2  # each main sample once per epoch


def test_downsampled_sizes_are_uniform_over_the_allowed_range():
    cfg = PatchConfig(patch_size=32, r_max=95)
    rng = np.random.default_rng(0)
    rs = np.array([plan_patch(200, 150, cfg, rng).r for _ in range(8000)])
    assert rs.min() == 32 and rs.max() == 95
    counts = np.histogram(rs, bins=np.arange(32, 97, 8))[0]  # 8 bins of 8 sizes each
    chi2 = ((counts - len(rs) / 8) ** 2 / (len(rs) / 8)).sum()
    assert chi2 < 24.3, counts  # 99.9% quantile of chi-square with 7 degrees of freedom
    small = np.array([plan_patch(70, 300, cfg, rng).r for _ in range(2000)])
    assert small.min() == 32 and small.max() == 70  # noqa  # capped by the image's short side


def test_keep_original_resolution_with_p_keep():
    cfg = PatchConfig(patch_size=32, r_max=64, p_keep=0.3)
    rng = np.random.default_rng(0)
    plans = [plan_patch(500, 400, cfg, rng) for _ in range(4000)]
    kept = [p for p in plans if p.kept]
    assert abs(len(kept) / 4000 - 0.3) < 0.03 and all(p.r == 400 for p in kept)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_crop_pixels_are_where_the_coords_say(fmt):
    # A ramp image: red encodes x, green encodes y (original pixels). The GT crop's pixels must
    # show the ramp values at the original positions its coords and the square address.
    w, h = 900, 700
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    img = Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).round().astype(np.uint8))
    data = png_bytes(img) if fmt == "png" else jpeg_bytes(img, quality=98)
    cfg = PatchConfig(patch_size=64, r_max=400, encoder_size=64)
    for seed in range(5):
        s = make_patch_sample(data, cfg, np.random.default_rng(seed))
        top, left, side = s["square"]
        orig_x = left + (s["coords"][..., 1].numpy() + 1) / 2 * side - 0.5  # pixel-centre index
        orig_y = top + (s["coords"][..., 0].numpy() + 1) / 2 * side - 0.5
        inner = (orig_x > 4 * side / s["r"]) & (orig_x < w - 1 - 4 * side / s["r"]) & \
                (orig_y > 4 * side / s["r"]) & (orig_y < h - 1 - 4 * side / s["r"])
        gt = s["gt"].numpy().astype(float)
        tol = 1.0 if fmt == "png" else 3.0
        assert np.abs(gt[0] - orig_x * 255 / (w - 1))[inner].max() < tol
        assert np.abs(gt[1] - orig_y * 255 / (h - 1))[inner].max() < tol
        assert np.allclose(s["cells"].numpy(), 2 / s["r"])


def test_reduced_jpeg_decode_gives_the_same_crop_as_full_decode():
    data = jpeg_bytes(noise_image(2400, 1800, 3), quality=95)
    for seed in range(3):
        fast = make_patch_sample(data, PatchConfig(fast_decode=True), np.random.default_rng(seed))
        full = make_patch_sample(data, PatchConfig(fast_decode=False), np.random.default_rng(seed))
        assert fast["r"] == full["r"] and torch.equal(fast["coords"], full["coords"])
        diff = (fast["gt"].float() - full["gt"].float()).abs().mean()
        assert diff < 4.0, diff  # same content; DCT-domain downscaling differs by a few levels


def test_resume_mid_epoch_reproduces_the_uninterrupted_batches(tmp_path):
    sizes = [(220, 210) if i % 5 == 0 else (40 + i % 50, 48) for i in range(60)]
    shards = small_shards(tmp_path, sizes, per_shard=11, hr_threshold=200)
    cfg = data_cfg(shards, p_hr=0.3)
    full = build_loader(cfg, rank=1, world_size=2)
    full.set_epoch(2)
    reference, states = [], []
    for batch in full.epoch_batches():
        reference.append(batch)
        states.append(full.state_dict())
    for k in (0, 3, len(reference) - 2):
        resumed = build_loader(cfg, rank=1, world_size=2)
        resumed.load_state_dict(states[k])
        rest = list(resumed.epoch_batches())
        assert len(rest) == len(reference) - k - 1
        for a, b in zip(reference[k + 1:], rest):
            assert a.keys == b.keys and torch.equal(a.gt, b.gt) and torch.equal(a.coords, b.coords)


@pytest.mark.parametrize("before,after,stop", [(2, 1, 3), (1, 2, 4)])
def test_resume_at_another_world_size_sees_each_sample_once_in_the_epoch(tmp_path, before, after, stop):
    """The position is a global sample count: stop a 2-rank epoch mid-way, go on with 1 rank
    (or the reverse), and the epoch still holds every sample exactly once."""
    shards = small_shards(tmp_path, [(40 + i % 30, 50) for i in range(48)], per_shard=7)
    cfg = data_cfg(shards, num_workers=1, batch_size=3)
    seen, state = Counter(), None  # 48 samples: both parts end on a global batch boundary
    for rank in range(before):
        loader = build_loader(cfg, rank, before)
        for batch in itertools.islice(loader.epoch_batches(), stop):
            seen.update(batch.keys)
        state = loader.state_dict()
    assert state == {"epoch": 0, "slot": stop * 3 * before, "batches": stop}
    for rank in range(after):
        loader = build_loader(cfg, rank, after)
        loader.load_state_dict(state)
        seen.update(k for b in loader.epoch_batches() for k in b.keys)
    assert set(seen) == {f"{i:09d}" for i in range(48)} and max(seen.values()) == 1


def write_tar(path: Path, samples: list[tuple[str, str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, ext, data in samples:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_input_zoo_is_counted_and_never_crashes(tmp_path):
    good = jpeg_bytes(noise_image(80, 60, 0))
    pal = noise_image(64, 64, 9).convert("P")
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    zoo = [("good0", "jpg", good), ("corrupt", "jpg", b"\xff\xd8\xff\xe0garbage" * 10),
           ("truncated", "jpg", jpeg_bytes(noise_image(300, 300, 1))[:2000]), ("empty", "jpg", b""),
           ("textonly", "txt", b"caption without an image"), ("gray", "jpg", jpeg_bytes(noise_image(64, 64, 2, "L"))),
           ("cmyk", "jpg", jpeg_bytes(noise_image(64, 64, 3, "CMYK"))),
           ("rgba", "png", png_bytes(noise_image(64, 64, 4, "RGBA"))),
           ("deep", "png", sixteen_bit_png(64, 64)), ("palette", "png", buf.getvalue()),
           ("rotated", "jpg", exif_rotated_jpeg(100, 40)), ("bomb", "png", bomb_png()),
           ("tiny", "jpg", jpeg_bytes(noise_image(20, 20, 5))), ("good1", "jpg", good)]
    shards = tmp_path / "zoo"
    shards.mkdir()
    write_tar(shards / "zoo-0.tar", zoo)
    write_tar(shards / "cut-1.tar", [(f"c{i}", "jpg", good) for i in range(6)])
    build_index(sorted(str(p) for p in shards.glob("*.tar")), shards, hr_threshold=100_000, workers=1)
    # What the index could not read is excluded there and counted in it, never reaching a worker.
    index = json.loads((shards / "index.json").read_text())
    assert index["skipped"] == {"not_an_image": 1, "empty_file": 1, "no_image_member": 1, "too_many_pixels": 1}
    cut = (shards / "cut-1.tar").read_bytes()
    (shards / "cut-1.tar").write_bytes(cut[: len(cut) // 2 + 100])  # truncated mid-member after indexing
    cfg = data_cfg(shards, batch_size=2, num_workers=2, patch=SMALL_PATCH | {"small": "skip"})
    loader, n = build_loader(cfg), 0
    for batch in loader.epoch_batches():
        n += len(batch)
        assert batch.gt.shape[1:] == (3, 32, 32)
    totals = Counter(loader.skip_counts())  # the workers' counts, kept by the loader beside the batches
    assert n == 16  # 10 readable + 6: every slot filled
    for reason in ("corrupt_image", "too_small", "truncated_shard", "replaced_by_duplicate"):
        assert totals[reason] >= 1, (reason, dict(totals))


def test_bad_config_values_name_the_key():
    from infd.config import ConfigError

    with pytest.raises(ConfigError, match=r"patch\.r_max"):
        from_mapping(DataConfig, {"shards": "x", "patch": {"patch_size": 256, "r_max": 128}})
    with pytest.raises(ConfigError, match=r"'p_hr'"):
        from_mapping(DataConfig, {"shards": "x", "p_hr": 1.5})


def test_missing_index_is_a_clear_error(tmp_path):
    from infd.config import ConfigError

    write_tar(tmp_path / "a.tar", [("k", "jpg", jpeg_bytes(noise_image(64, 64, 0)))])
    with pytest.raises(ConfigError, match="no shard index"):
        build_loader(data_cfg(tmp_path))


def test_pipe_urls_are_refused_with_the_reason(tmp_path):
    from infd.config import ConfigError
    from infd.data.urls import ShardReadError, read_range

    shards = small_shards(tmp_path, [(48, 48)] * 4, per_shard=4)
    pipes = [f"pipe:cat {p}" for p in sorted(shards.glob("*.tar"))]
    with pytest.raises(ConfigError, match="pipe: shard URLs cannot be read by offset"):
        build_loader(data_cfg(pipes, index=str(shards / "index.json")))
    with pytest.raises(ShardReadError, match="random access"):
        read_range(pipes[0], 0, 10)


def test_shards_are_readable_by_the_webdataset_library(tmp_path):
    import webdataset as wds

    shards = small_shards(tmp_path, [(48, 48), (64, 50), (70, 40)], per_shard=3)
    samples = list(wds.WebDataset(str(shards / "shard-000000.tar"), shardshuffle=False,
                                  nodesplitter=wds.split_by_node))
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002"]
    assert all({"jpg", "json"} <= set(s) for s in samples)


def test_captions_come_with_the_samples_from_both_streams(tmp_path):
    from tests.images import write_folder

    paths = write_folder(tmp_path / "src", [(1200, 900) if i % 4 == 0 else (120, 100) for i in range(16)])
    build(tmp_path / "src", str(tmp_path / "shards"), "--min-side", "64", "--samples-per-shard", "4")
    caption_of = {f"{i:09d}": p.with_suffix(".txt").read_text() for i, p in enumerate(sorted(paths))}
    cfg = data_cfg(tmp_path / "shards", p_hr=0.5, num_workers=0)
    batches = list(build_loader(cfg).epoch_batches())
    assert any(b.is_hr.any() for b in batches) and any((~b.is_hr).any() for b in batches)
    for b in batches:
        assert b.captions == [caption_of[k] for k in b.keys]


# ----- high-res fine-tuning: p_keep switches to p_keep_late at a trainer step ----------------------
LATE_PATCH = {"patch_size": 64, "r_max": 128, "encoder_size": 64, "p_keep": 0.0, "p_keep_late": 1.0}


@pytest.fixture(scope="module")
def late_shards(tmp_path_factory):
    # 28 images -> 14 batches of 2 per epoch.
    return small_shards(tmp_path_factory.mktemp("late"), [(300 + 13 * i % 100, 330 + 7 * i % 70) for i in range(28)],
                        per_shard=10)


def late_batches(shards, switch_step: int, clock: tuple[int, int], state: dict | None = None, epoch: int = 0,
                 **kw) -> list[dict]:
    """clock: (batches of the run before this epoch, batches per trainer step)."""
    cfg = data_cfg(shards, batch_size=2, patch=LATE_PATCH | {"p_keep_late_step": switch_step}, **kw)
    loader = build_loader(cfg, batches_per_step=clock[1])
    loader.load_state_dict(state or {"epoch": epoch, "slot": 0, "batches": clock[0]})
    return list(loader.epoch_batches())


def kept_pattern(batches: list[dict]) -> list[bool]:
    """Per batch: all samples kept (True) or none (False); a mixed batch fails."""
    out = []
    for b in batches:
        assert b.kept.all() or not b.kept.any(), b.kept
        assert (b.r <= 128).all() != b.kept.all()  # kept: r = the image's short side (>= 300)
        out.append(bool(b.kept.all()))
    return out


@pytest.mark.parametrize("clock,switch_batch", [((0, 1), 6), ((0, 2), 12), ((5, 1), 1)])
def test_p_keep_late_switches_at_the_batch_of_its_trainer_step(late_shards, clock, switch_batch):
    kept = kept_pattern(late_batches(late_shards, 6, clock))
    assert kept == [e >= switch_batch for e in range(14)]


def test_resume_across_the_p_keep_late_switch_reproduces_the_uninterrupted_batches(late_shards):
    # This epoch starts at run batch 1: the switch (step 6) is its batch 5.
    reference = late_batches(late_shards, 6, (1, 1), epoch=1)
    assert kept_pattern(reference) == [e >= 5 for e in range(14)]
    for j in (3, 8):
        rest = late_batches(late_shards, 6, (1, 1), {"epoch": 1, "slot": 2 * j, "batches": 1 + j})
        assert len(rest) == len(reference) - j
        for a, b in zip(reference[j:], rest):
            assert a.keys == b.keys and torch.equal(a.kept, b.kept) and torch.equal(a.r, b.r)
            for key in ("gt", "enc", "coords"):
                assert torch.equal(getattr(a, key), getattr(b, key)), key


def test_p_keep_late_config_values_name_the_key():
    from infd.config import ConfigError

    with pytest.raises(ConfigError, match=r"patch\.p_keep_late'"):
        from_mapping(DataConfig, {"shards": "x", "patch": {"p_keep_late": 1.5}})
    with pytest.raises(ConfigError, match=r"patch\.p_keep_late_step'"):
        from_mapping(DataConfig, {"shards": "x", "patch": {"p_keep_late": 0.5, "p_keep_late_step": -1}})
    late = from_mapping(PatchConfig, {"p_keep": 0.1, "p_keep_late": 0.5, "p_keep_late_step": 400_000}).late()
    assert late.p_keep == 0.5 and late.p_keep_late_step == 400_000


@pytest.mark.slow
def test_data_workers_ignore_stop_signals_and_die_with_their_trainer(tmp_path):
    """Clusters signal every process of a job; the trainer owns shutdown (it checkpoints first), so
    its workers must survive SIGTERM/SIGINT/SIGHUP/SIGUSR1/SIGUSR2, yet not outlive a killed trainer."""
    import psutil

    shards = small_shards(tmp_path, [(80, 64)] * 8, per_shard=4)
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "loader_under_signals.py"), str(shards)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline().split()
    assert line[-1:] == ["survived"], proc.stderr.read()[-3000:]
    workers = [psutil.Process(int(pid)) for pid in line[:-1]]
    assert len(workers) == 2
    proc.kill()  # SIGKILL: no chance to stop its workers itself
    proc.wait(timeout=10)
    deadline = time.time() + 3  # the kernel's parent-death signal, not PyTorch's 5 s watchdog
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers)
    # A parent that exits with its workers up terminates them (SIGTERM from the parent still works).
    done = subprocess.run([sys.executable, str(SCRIPTS / "loader_under_signals.py"), str(shards), "exit"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and done.stdout.split()[-1] == "survived", done.stderr[-3000:]


def _alive(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("p_hr", [0.0, 0.3, 0.5])
def test_a_slots_main_position_is_the_count_of_main_slots_before_it(p_hr):
    from infd.data.epoch_plan import SlotPlan

    plan = SlotPlan(p_hr, 1000, seed=0, epoch=3)
    main = 0
    for g in range(plan.slots + 1):
        assert plan.main_position(g) == main
        main += not plan.is_hr(g)
    assert plan.main_position(plan.slots) <= 1000 < plan.main_position(plan.slots + 2)
    assert abs(sum(plan.is_hr(g) for g in range(plan.slots)) - p_hr * plan.slots) <= 1


def test_a_stage_builds_only_the_tensors_it_trains_on(tmp_path):
    """Typed batches: the GT crop and its query grid only with patch.gt (stage 1, or stage 2 when it
    asks for them); the same samples either way; bookkeeping is the loader's, not the batch's."""
    from infd.data.batches import PatchBatch
    from train.autoencoder import AutoencoderTrainConfig
    from train.diffusion import DiffusionTrainConfig

    shards = small_shards(tmp_path, [(90, 80), (120, 100), (70, 70), (150, 90)], per_shard=2)
    with_gt = list(build_loader(data_cfg(shards, batch_size=2)).epoch_batches())
    loader = build_loader(data_cfg(shards, batch_size=2, patch=SMALL_PATCH | {"gt": False}))
    without = list(loader.epoch_batches())
    assert all(isinstance(b, PatchBatch) for b in with_gt + without)
    assert [b.keys for b in with_gt] == [b.keys for b in without] and len(without) == 2
    for a, b in zip(with_gt, without):
        assert a.gt.shape == (2, 3, 32, 32) and a.coords.shape == a.cells.shape == (2, 32, 32, 2)
        assert b.gt is None and b.coords is None and b.cells is None and b.enc.shape == (2, 3, 32, 32)
        assert torch.equal(a.r, b.r) and a.captions == b.captions
        assert (a.enc.float() - b.enc.float()).abs().mean() < 2  # a coarser decode serves the encoder input alone
    assert loader.state_dict() == {"epoch": 1, "slot": 0, "batches": 2} and set(loader.skips) == {0, 1}
    moved = without[0].to(torch.device("cpu"))
    assert moved.enc.dtype == torch.float32 and -1 <= moved.enc.min() <= moved.enc.max() <= 1
    assert not DiffusionTrainConfig().data.loader.patch.gt and AutoencoderTrainConfig().data.loader.patch.gt
    with pytest.raises(Exception, match="data.loader.patch.gt"):
        from_mapping(AutoencoderTrainConfig, {"data": {"loader": {"patch": {"gt": False}}}})


def _node_cfg(shards, batch_size: int):
    return data_cfg(shards, num_workers=2, batch_size=batch_size, p_hr=0.25, order="node", canonical_nodes=2,
                    shuffle_block=10)


def _global_batches(shards, world: int, batch_size: int, start=None, stop=None) -> tuple[list[set], dict]:
    """Per global batch: (main keys, high-res keys) over every rank of a `world`-rank job; its end position."""
    per_rank, state = [], None
    for rank in range(world):
        loader = build_loader(_node_cfg(shards, batch_size), rank, world)
        if start is not None:
            loader.load_state_dict(start)
        per_rank.append(list(itertools.islice(loader.epoch_batches(), stop)))
        state = loader.state_dict()
    merged = []
    for batches in zip(*per_rank):
        main = {k for b in batches for k, hr in zip(b.keys, b.is_hr.tolist()) if not hr}
        high = sorted(k for b in batches for k, hr in zip(b.keys, b.is_hr.tolist()) if hr)
        merged.append((main, high))
    return merged, state


def test_node_order_gives_the_same_global_batches_at_any_world_size_and_resumes_across_them(tmp_path):
    """data.loader.order=node with 2 canonical nodes, global batch 8, 2 loader workers, p_hr 0.25: 1, 2 and 4
    ranks (1 per node) build the same global batches; 2 ranks stopped after 3 batches and resumed on 4 (and
    on 1) continue them exactly, each main-stream sample once in the epoch."""
    sizes = [(220, 210) if i % 6 == 0 else (40 + i % 30, 50) for i in range(84)]
    shards = small_shards(tmp_path, sizes, per_shard=7, hr_threshold=200)
    reference, _ = _global_batches(shards, 1, 8)
    assert len(reference) >= 8
    for world in (2, 4):
        assert _global_batches(shards, world, 8 // world)[0] == reference
    first, state = _global_batches(shards, 2, 4, stop=3)
    assert first == reference[:3] and state["slot"] == 24
    for world in (4, 1):
        rest, _ = _global_batches(shards, world, 8 // world, start=state)
        assert first + rest == reference
    main = [k for m, _ in reference for k in m]
    assert len(main) == len(set(main)) and sum(len(h) for _, h in reference) == 2 * len(reference)
