"""The run store: zarr v3 layout, row blocks, manifest, sample index, lock, read/query API. No models.

Modules: layout (ArraySpec, plan_row_blocks), store (RunStore), manifest (per-shard records),
sample_index (Parquet row → sample map), lock (single writer), query (read side), status (report),
location (URL → filesystem helpers). Nothing is imported here so that light users (the lock, the
planner) do not pay for zarr.
"""
