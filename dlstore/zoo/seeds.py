"""Seeds derived by name: init, data order and label noise are separable sources of randomness.

A run sets `seed`; unless a config sets them apart, each source gets its own seed derived from it
by hashing (seed, purpose). Nothing here depends on a member's position in a cohort.
"""

import hashlib


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for `purpose` (e.g. "init", "order", "noise") derived from `seed`."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
