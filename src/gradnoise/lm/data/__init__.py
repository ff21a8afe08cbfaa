"""The corpora: their registry, download and checksum, tokens and splits, batches and augmentation."""
