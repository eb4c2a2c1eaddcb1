"""Documents -> chunk plans: segmentation, boundary scores, domain profiles, the Zarr chunk index, sharding.

``config`` (PlannerConfig) imports nothing heavy: ``rollout_dist.config`` imports it.  The rest is imported
from its module: ``planner.plan_document``, ``index.write_index`` / ``index.ChunkIndex``,
``sharding.BalancedSharder``; the CLI is ``python -m rollout_dist.plan``.
"""
