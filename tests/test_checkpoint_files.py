"""The checkpoint's file layer: our safetensors writer against the safetensors reader, and the portable
layout's ownership (each tensor written once, by one rank, in balanced shares) read back whole."""
import pytest
import torch
from safetensors.torch import load_file

from train.durable import STAGE_BYTES, write_safetensors
from train.portable import assign_owners, read_tensors, shard_name


def test_written_files_load_with_safetensors_bit_for_bit(tmp_path):
    tensors = {"w": torch.randn(3, 5), "steps": torch.arange(7), "empty": torch.randn(0, 4),
               "scalar": torch.tensor(2.5), "mask": torch.rand(4, 4) > 0.5, "half": torch.randn(6).bfloat16(),
               "large": torch.randn(STAGE_BYTES // 4 + 3),  # crosses the staging buffer's size
               "strided": torch.randn(8, 6).t()}  # not contiguous
    size = write_safetensors(tmp_path / "x.safetensors", tensors)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert size == (tmp_path / "x.safetensors").stat().st_size
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_owners_cover_every_tensor_once_in_balanced_shares(tmp_path):
    sizes = {f"layer{i}.weight": 4 * (1000 + 37 * i) for i in range(50)} | {"big": 4 * 20000}
    for world in (1, 2, 3, 8):
        owners = assign_owners(sizes, world)
        assert set(owners) == set(sizes) and set(owners.values()) <= set(range(world))
        load = [sum(s for n, s in sizes.items() if owners[n] == r) for r in range(world)]
        assert max(load) - min(load) <= max(sizes.values())  # greedy largest-first: within one tensor
        assert owners == assign_owners(dict(reversed(list(sizes.items()))), world)  # any order of the names
    # Written as the ranks write them, read back whole.
    tensors = {name: torch.randn(s // 4) for name, s in sizes.items()}
    owners = assign_owners(sizes, 3)
    folder = tmp_path / "step" / "portable" / "unet"
    folder.mkdir(parents=True)
    for rank in range(3):
        mine = {n: t for n, t in tensors.items() if owners[n] == rank}
        write_safetensors(folder / shard_name("weights", rank, 3), mine)
    back = read_tensors(tmp_path / "step", "unet", "weights")
    assert set(back) == set(tensors) and all(torch.equal(back[n], t) for n, t in tensors.items())
    (folder / shard_name("weights", 2, 3)).unlink()
    with pytest.raises(FileNotFoundError, match="2 of 3"):
        read_tensors(tmp_path / "step", "unet", "weights")


class _TensorPart:
    """A checkpoint part with one tensor file; `blocked` puts a file where its folder goes (a real write error)."""

    def __init__(self):
        self.blocked, self.weight = False, torch.randn(1000)

    def save(self, writer, info) -> dict:
        if self.blocked:
            (writer.directory / "part").write_text("not a folder")
        writer.tensors("part/w.safetensors", {"w": self.weight})
        return {}

    def load(self, path, state, info) -> None:
        self.weight = load_file(str(path / "part" / "w.safetensors"))["w"]


def test_a_failed_background_save_is_logged_leaves_latest_and_the_next_save_publishes(tmp_path, caplog):
    import torch.distributed as dist

    from train.checkpoint import Checkpointer, latest_checkpoint
    from train.dist import DistInfo

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        part = _TensorPart()
        saver = Checkpointer(tmp_path, [part], DistInfo(0, 0, 1, torch.device("cpu")), keep_last=3)
        saver.save(1)
        part.blocked = True
        saver.save(2, background=True)
        assert saver.wait() is False and "background checkpoint of step 2 failed" in caplog.text
        assert latest_checkpoint(tmp_path) == tmp_path / "step_0000001" and not (tmp_path / "step_0000002").exists()
        part.blocked, saved = False, part.weight.clone()
        saver.save(3, background=True)
        assert saver.wait() is True and latest_checkpoint(tmp_path) == tmp_path / "step_0000003"
        assert not (tmp_path / "step_0000002.tmp").exists()  # cleared once a later save is published
        part.weight = torch.zeros(1000)
        assert saver.load(tmp_path / "step_0000003") == 3 and torch.equal(part.weight, saved)
    finally:
        dist.destroy_process_group()
