"""Run one rank of the loader (rank and world size from torchrun's environment) and dump the
keys of every batch of the given epochs as JSON to OUT.rank<R>.json."""
import json
import os
import sys

from infd.config import from_mapping
from infd.data.loader import DataConfig, build_loader


def main() -> None:
    shards, out, epochs = sys.argv[1], sys.argv[2], [int(e) for e in sys.argv[3].split(",")]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = from_mapping(DataConfig, {"shards": shards, "batch_size": 4, "num_workers": 2,
                                    "patch": {"patch_size": 32, "r_max": 64, "encoder_size": 32}})
    loader = build_loader(cfg, rank, world)
    result = {}
    for epoch in epochs:
        loader.set_epoch(epoch)
        result[epoch] = [batch.keys for batch in loader.epoch_batches()]
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"batches_per_epoch": loader.batches_per_epoch, "epochs": result}, f)


if __name__ == "__main__":
    main()
