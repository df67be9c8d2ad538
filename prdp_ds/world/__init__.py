"""A small synthetic text-to-image world for PRDP in miniature (see prdp_ds/world/README in weights).

Importing this package registers the prompt sets `world_small`, `world_large`, `world_seen`, `world_unseen` and
the rewards `world_aesthetic`, `world_alignment`, `world_judge`.
"""
from prdp_ds.world import scenes  # noqa: F401  (registers the prompt sets)
from prdp_ds.world import rewards  # noqa: F401  (registers the rewards)
