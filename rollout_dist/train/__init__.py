"""The roles a training run is composed of; ``rollout_dist.trainer.Trainer`` runs the loop over them.

- ``context``: this process's device, process group and rank layout, and the collectives the loop needs;
- ``data_pipeline``: documents, planned chunks, the per-rank document order (resumable);
- ``planner``: what fits where: host memory up front, chunk size and kept outputs from GPU memory;
- ``model_setup``: building the model with the refusals that come before anything is written; stage trimming;
- ``engine_setup``: the DeepSpeed engine and the fixes it needs for many-backward steps;
- ``metrics``: per-step statistics and the sinks they go to (console, train.log, metrics.jsonl, TensorBoard);
- ``checkpointing``: the ``Checkpointer`` interface and its DeepSpeed implementation;
- ``export``: the final HF model and ``summary.json``.
"""
