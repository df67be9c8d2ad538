"""A small synthetic text-to-image world for PRDP in miniature (docs/world.md; prdp_ds/world/weights/README.md).

Its prompt sets (`world_small`, `world_large`, `world_seen`, `world_unseen`, `world_demo`; prdp_ds.world.scenes),
rewards (`world_aesthetic`, `world_alignment`, `world_judge`; prdp_ds.world.rewards) and base model
(`model.pretrained: world`; prdp_ds.world.model) are named in the registries of prdp_ds.prompts, prdp_ds.rewards
and prdp_ds.models, which import them the first time a name is used.
"""
