"""Backends of the losses: Triton kernels with their launchers, and the chunked PyTorch equivalents.

Both backend modules expose the same functions for every loss: `forward` and `backward`, and the two
halves of `forward`, `partials` (the streaming pass over some columns) and `finalize` (rows from
merged partial statistics), which the vocabulary-parallel losses call with a collective in between.
`csd_kernels.ops` picks a module by name and imports it lazily.
"""
