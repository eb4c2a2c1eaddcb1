"""Digests of every rank's state, a coordinator that orders and broadcasts them, and the checks they allow.

digest.py: the record and its binary layout, and how tensors are reduced to fingerprints; service.py: the
coordinator (ordering, batches) and its transports (TCP side channel, mpi4py); docs/coordinator.md: the design.
"""
from .digest import Digest, DigestFormatError, block_checksum, pack_all, unpack_all

__all__ = ["Digest", "DigestFormatError", "block_checksum", "pack_all", "unpack_all"]
