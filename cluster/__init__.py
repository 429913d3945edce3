"""Where work runs: the executor every job receives (executor: in this process or on Ray, same
interface), Ray itself (runtime), actor pools over shards with retries (shard_pool), reductions over
row blocks and per-item fan-out (reduce), and the progress display (progress).

Ray itself is imported only inside the functions that need it, so importing these modules is cheap.
Nothing is re-exported here: import from the modules.
"""
