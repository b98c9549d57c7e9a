"""Context parallelism for the DiT: a 2-D mesh, Ulysses all-to-all inside it and ring attention across it.

Layout everywhere: ``[B, L, H, D]`` (batch, tokens, heads, head_dim), as in `wan/attention.py`.
"""

from .context_parallel import ContextParallelSharding, apply_context_parallel, remove_context_parallel
from .mesh import ContextMesh, context_attention, validate_mesh
from .ring import block_attention_reference, merge_partial, ring_attention
from .ulysses import heads_to_seq, seq_to_heads

__all__ = [
    "ContextMesh",
    "ContextParallelSharding",
    "apply_context_parallel",
    "block_attention_reference",
    "context_attention",
    "heads_to_seq",
    "merge_partial",
    "remove_context_parallel",
    "ring_attention",
    "seq_to_heads",
    "validate_mesh",
]
