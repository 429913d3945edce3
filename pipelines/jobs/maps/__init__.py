"""`clipscope maps`: activation maps of a zoo model over webdataset shards (per-sample rows, like extraction;
not a reduction job)."""
