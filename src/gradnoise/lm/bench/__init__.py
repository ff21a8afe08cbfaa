"""The benchmarks: the noise op against a normal fill, the batched step, a train run; and their reports."""
