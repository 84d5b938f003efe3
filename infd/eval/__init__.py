"""Generative metrics: FID with the standard Inception (or a random-init stand-in offline), the
INFD paper's pFID P/1K crops, CLIP score, and a cache of real-image statistics.

Modules: `frechet` (the distance and feature statistics), `features` (the feature network),
`pfid` (crop geometry and real-image preparation), `clip_score`, `stats_cache`.
Heavy libraries (torch-fidelity, torchmetrics, open_clip, scipy) are imported inside functions.
"""
