"""Generative metrics: FID with the standard Inception (or a random-init stand-in offline), the
INFD paper's pFID P/1K crops, CLIP score, and a cache of real-image statistics.

Modules: `frechet` (the distance, feature statistics and their sums over ranks), `features` (the
feature network), `pfid` (crop geometry and real-image preparation), `clip_score`, `stats_cache`,
`real_set` (the real images, chosen from the shard index), `samples` (generated images by index,
stored as PNGs), `generative` (the whole evaluation, sharded over ranks: `evaluate_generator`).
Heavy libraries (torch-fidelity, torchmetrics, open_clip, scipy) are imported inside functions.
"""
