"""Every exit code of the `clipscope` command (README's table lists the same)."""

OK = 0
FAILED_SHARDS = 1  # some shards are recorded as failed (`--retry-failed` tries them again)
BAD_INPUT = 2  # a ClipscopeError: bad flag, path, model, store; nothing was written
PARTIAL = 3  # every shard is done, but some samples of some shards were not read (`--allow-partial`: 0)
ENVIRONMENT = 4  # the machine failed us: disk full, read-only file system, permission denied, no network
CORRUPT = 5  # `status --verify`: rows of a done shard no longer match their recorded checksum
INTERRUPTED = 130  # SIGINT (Ctrl-C); rerun the same command to resume
OUTPUT_CLOSED = 141  # stdout was closed early (`clipscope status STORE | head`)
TERMINATED = 143  # SIGTERM; rerun the same command to resume
