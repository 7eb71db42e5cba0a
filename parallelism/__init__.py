"""Parallelism: ring attention, zigzag sharding, StreamBP, activation offload, HDP grad sync."""

from parallelism.comm import (
    CommProtocolError,
    CommStats,
    RingComm,
    RingCommError,
    check_ring,
    ring_sum,
)
from parallelism.grad_sync import GradBuffer, all_reduce_gradients
from parallelism.offload import (
    AttentionCore,
    HostSwapper,
    LiveBytesMeter,
    TokenwiseOffloadStack,
    local_attention_core,
    ring_attention_core,
)
from parallelism.ring_attention import (
    RingSetup,
    ring_attention,
    ring_attention_backward,
    ring_attention_forward,
    ring_attention_setup,
)
from parallelism.ring_reference import ring_attention_reference
from parallelism.streambp import StreamBPStack, plan_stream_chunks, streambp_layer_backward
from parallelism.zigzag import (
    ZigzagLayout,
    zigzag_chunk_bounds,
    zigzag_index,
    zigzag_shard,
    zigzag_unshard,
)

__all__ = [
    "AttentionCore",
    "CommProtocolError",
    "CommStats",
    "GradBuffer",
    "HostSwapper",
    "LiveBytesMeter",
    "RingComm",
    "RingCommError",
    "RingSetup",
    "StreamBPStack",
    "TokenwiseOffloadStack",
    "ZigzagLayout",
    "all_reduce_gradients",
    "check_ring",
    "local_attention_core",
    "plan_stream_chunks",
    "ring_attention",
    "ring_attention_backward",
    "ring_attention_core",
    "ring_attention_forward",
    "ring_attention_reference",
    "ring_attention_setup",
    "ring_sum",
    "streambp_layer_backward",
    "zigzag_chunk_bounds",
    "zigzag_index",
    "zigzag_shard",
    "zigzag_unshard",
]
