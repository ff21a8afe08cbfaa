"""Seeds derived from a run's seed, one per purpose, so that the streams they start are unrelated.

The batches, the noise, evaluation and augmentation each draw from a generator seeded with
`derive_seed(seed, purpose)`: turning one of them on or off shifts none of the others.
"""

import hashlib


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one purpose ("batches", "noise", an eval split, …): the first 8
    bytes of sha256("{seed}/{purpose}"), halved. Streams seeded this way are unrelated,
    so turning one on (augmentation, noise) does not shift another (the batches)."""
    digest = hashlib.sha256(f"{seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
