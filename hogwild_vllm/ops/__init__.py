"""Cache and attention ops for Hogwild! inference. For now the pure-PyTorch references (oracle and fallback)."""

from hogwild_vllm.ops.reference import (
    DeltaRotation,
    DenseView,
    SegmentTable,
    dense_view_attention_reference,
    hogwild_attention_reference,
    materialize_views_reference,
    write_kv_reference,
)

__all__ = [
    "DeltaRotation",
    "DenseView",
    "SegmentTable",
    "dense_view_attention_reference",
    "hogwild_attention_reference",
    "materialize_views_reference",
    "write_kv_reference",
]
