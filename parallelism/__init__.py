"""Parallelism: ring attention, zigzag sharding, StreamBP, activation offload, HDP grad sync."""

from parallelism.offload import (
    AttentionCore,
    HostSwapper,
    LiveBytesMeter,
    TokenwiseOffloadStack,
    local_attention_core,
)
from parallelism.streambp import StreamBPStack, plan_stream_chunks, streambp_layer_backward

__all__ = [
    "AttentionCore",
    "HostSwapper",
    "LiveBytesMeter",
    "StreamBPStack",
    "TokenwiseOffloadStack",
    "local_attention_core",
    "plan_stream_chunks",
    "streambp_layer_backward",
]
