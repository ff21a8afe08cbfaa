"""The train loop and what it runs on: set-up, run state and resume rules, evaluation, per-replica
optimizer settings, batched groups, distributed data parallel, finiteness checks and provenance."""
