"""Context parallelism for the DiT: a 2-D mesh, Ulysses all-to-all inside it and ring attention across it.

Layout everywhere: ``[B, L, H, D]`` (batch, tokens, heads, head_dim), as in `wan/attention.py`.
"""

from .mesh import ContextMesh, context_attention, validate_mesh
from .ring import block_attention_reference, merge_partial, ring_attention
from .ulysses import heads_to_seq, seq_to_heads

__all__ = [
    "ContextMesh",
    "block_attention_reference",
    "context_attention",
    "heads_to_seq",
    "merge_partial",
    "ring_attention",
    "seq_to_heads",
    "validate_mesh",
]
