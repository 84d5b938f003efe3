"""`infd view`: a deep-zoom page over latents, tiles rendered on request (tiles.py, server.py, static/)."""
