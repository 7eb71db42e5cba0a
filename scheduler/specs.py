"""Model and cluster specs: the two inputs of every cost, memory and plan computation.

Pydantic models (they sit at the edge: job specs embed them, the CLI prints their JSON
Schema), frozen, unknown fields rejected. Presets carry the figures the planner uses; each
cluster figure says where it comes from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scheduler.errors import SpecError

DType = Literal["float64", "float32", "float16", "bfloat16"]

DTYPE_BYTES: dict[str, int] = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Spec):
    """A Llama-style decoder: RMSNorm, RoPE, GQA, SwiGLU, untied LM head."""

    vocab_size: int = Field(gt=0, description="Number of token ids the embedding and head cover.")
    hidden_size: int = Field(gt=0, description="Width of the residual stream.")
    num_layers: int = Field(gt=0, description="Number of decoder layers.")
    num_heads: int = Field(gt=0, description="Query heads per layer.")
    num_kv_heads: int = Field(gt=0, description="Key/value heads (GQA); divides num_heads.")
    ffn_hidden_size: int = Field(gt=0, description="Inner width of the SwiGLU MLP.")
    rope_theta: float = Field(default=10000.0, gt=0, description="RoPE base frequency.")
    norm_eps: float = Field(default=1e-5, gt=0, description="RMSNorm epsilon.")
    dtype: DType = Field(default="bfloat16", description="Parameter and activation dtype.")

    @model_validator(mode="after")
    def _check_heads(self) -> ModelSpec:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim=hidden_size/num_heads={self.head_dim} must be even (RoPE)")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def parameter_numels(self) -> list[int]:
        """Elements of each parameter tensor, in workers.model.Transformer.parameters() order
        (embedding; per layer attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down;
        final norm; head)."""
        h, kv, f = self.hidden_size, self.num_kv_heads * self.head_dim, self.ffn_hidden_size
        layer = [h, h * h, h * kv, h * kv, h * h, h, h * f, h * f, f * h]
        return [self.vocab_size * h, *layer * self.num_layers, h, self.vocab_size * h]

    @property
    def num_params(self) -> int:
        """Exact parameter count of workers.model.Transformer for this spec."""
        return sum(self.parameter_numels())

    @classmethod
    def from_hf_config(cls, source: str | Path | dict, *, dtype: DType | None = None) -> ModelSpec:
        """Build from a Hugging Face LlamaConfig (a config.json path or its dict)."""
        if not isinstance(source, dict):
            path = Path(source)
            try:
                source = json.loads(path.read_text())
            except FileNotFoundError as exc:
                raise SpecError(f"model config {path}: file not found") from exc
            except json.JSONDecodeError as exc:
                raise SpecError(f"model config {path}: not valid JSON ({exc})") from exc
        cfg = source
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size"]
        missing = [k for k in required if k not in cfg]
        if missing:
            raise SpecError(f"HF config is missing field(s) {missing}; a LlamaConfig has them")
        torch_dtype = cfg.get("torch_dtype", "bfloat16")
        fields = dict(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            ffn_hidden_size=cfg["intermediate_size"],
            rope_theta=cfg.get("rope_theta", 10000.0),
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            dtype=dtype or (torch_dtype if torch_dtype in DTYPE_BYTES else "bfloat16"),
        )
        return parse_spec(cls, fields, what="HF model config")


class ClusterSpec(_Spec):
    """The hardware a job runs on, as the cost model sees it (per-GPU achieved figures)."""

    num_nodes: int = Field(gt=0, description="Number of machines.")
    gpus_per_node: int = Field(gt=0, description="Accelerators (ranks) per machine.")
    gpu_memory_gib: float = Field(gt=0, description="Device memory per rank, GiB.")
    achieved_tflops: float = Field(gt=0, description="Achieved dense TFLOP/s per rank.")
    intra_node_bandwidth_gbps: float = Field(
        gt=0, description="Per-rank per-direction bandwidth inside a node, GB/s (NVLink).")
    inter_node_bandwidth_gbps: float = Field(
        gt=0, description="Per-rank per-direction bandwidth across nodes, GB/s (NIC).")
    pcie_bandwidth_gbps: float = Field(
        gt=0, description="Host<->device copy bandwidth per rank, GB/s (offload).")
    host_memory_gib: float = Field(gt=0, description="Host memory per node, GiB.")

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node


MODEL_PRESETS: dict[str, ModelSpec] = {
    # Small enough to train on a 2-core CPU in tests; float32 by default.
    "tiny": ModelSpec(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=128, rope_theta=10000.0, norm_eps=1e-5, dtype="float32"),
    # Llama-2 7B/13B/70B shapes (Touvron et al. 2023, Table 1 and HF configs).
    "llama-7b": ModelSpec(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                          num_kv_heads=32, ffn_hidden_size=11008, rope_theta=10000.0),
    "llama-13b": ModelSpec(vocab_size=32000, hidden_size=5120, num_layers=40, num_heads=40,
                           num_kv_heads=40, ffn_hidden_size=13824, rope_theta=10000.0),
    "llama-70b": ModelSpec(vocab_size=32000, hidden_size=8192, num_layers=80, num_heads=64,
                           num_kv_heads=8, ffn_hidden_size=28672, rope_theta=10000.0),
}

# Per-GPU achieved figures, not datasheet peaks:
# - h100: 80 GiB HBM3; ~400 TFLOP/s bf16 dense achieved (40% of the 989 TFLOP/s SXM peak,
#   what Megatron-style training reaches at MFU ~40%); NVLink 4 is 900 GB/s bidirectional
#   per GPU, ~450 GB/s per direction; one 400 Gb/s NDR NIC per GPU = 50 GB/s; PCIe Gen5 x16
#   ~64 GB/s raw, ~50 GB/s achieved; DGX H100 has 2 TiB host memory.
# - a800: 80 GiB HBM2e; ~200 TFLOP/s bf16 achieved (64% of 312 peak, MEMO's setting);
#   NVLink capped at 400 GB/s bidirectional (200 per direction); 200 Gb/s NIC per GPU =
#   25 GB/s; PCIe Gen4 ~25 GB/s achieved; 1 TiB host memory.
# - cpu: this 2-core machine, measured roughly: ~0.05 TFLOP/s fp32 matmul, loopback gloo
#   ~2 GB/s, memcpy ~5 GB/s; 24 GiB memory split as 12 "device" + 12 host. One node holds
#   every rank (gpus_per_node None: as many as asked for).
CLUSTER_PRESETS: dict[str, dict] = {
    "h100": dict(gpus_per_node=8, gpu_memory_gib=80.0, achieved_tflops=400.0,
                 intra_node_bandwidth_gbps=450.0, inter_node_bandwidth_gbps=50.0,
                 pcie_bandwidth_gbps=50.0, host_memory_gib=2048.0),
    "a800": dict(gpus_per_node=8, gpu_memory_gib=80.0, achieved_tflops=200.0,
                 intra_node_bandwidth_gbps=200.0, inter_node_bandwidth_gbps=25.0,
                 pcie_bandwidth_gbps=25.0, host_memory_gib=1024.0),
    "cpu": dict(gpus_per_node=None, gpu_memory_gib=12.0, achieved_tflops=0.05,
                intra_node_bandwidth_gbps=2.0, inter_node_bandwidth_gbps=1.0,
                pcie_bandwidth_gbps=5.0, host_memory_gib=12.0),
}


def model_preset(name: str) -> ModelSpec:
    """A model preset by name, or a ModelSpec from a HF config.json path."""
    if name in MODEL_PRESETS:
        return MODEL_PRESETS[name]
    if name.endswith(".json"):
        return ModelSpec.from_hf_config(name)
    raise SpecError(
        f"model={name!r} is not a preset ({', '.join(MODEL_PRESETS)}) or a config.json path"
    )


def cluster_preset(name: str, *, num_ranks: int | None = None,
                   gpus_per_node: int | None = None) -> ClusterSpec:
    """A cluster preset sized to `num_ranks` (rounded up to whole nodes)."""
    if name not in CLUSTER_PRESETS:
        raise SpecError(f"cluster={name!r} is not a preset; valid: {', '.join(CLUSTER_PRESETS)}")
    fields = dict(CLUSTER_PRESETS[name])
    if fields["gpus_per_node"] is None:  # a single-machine preset: one node of every rank
        fields["gpus_per_node"] = num_ranks or 1
    if gpus_per_node is not None:
        if gpus_per_node < 1:
            raise SpecError(f"gpus_per_node={gpus_per_node} must be >= 1")
        fields["gpus_per_node"] = gpus_per_node
    if num_ranks is not None:
        if num_ranks < 1:
            raise SpecError(f"num_ranks={num_ranks} must be >= 1")
        gpn = fields["gpus_per_node"]
        if num_ranks < gpn:
            fields["gpus_per_node"] = num_ranks
        elif num_ranks % gpn:
            raise SpecError(
                f"num_ranks={num_ranks} is not a multiple of gpus_per_node={gpn}; "
                "give whole nodes or set gpus_per_node"
            )
        fields["num_nodes"] = max(1, math.ceil(num_ranks / fields["gpus_per_node"]))
    else:
        fields["num_nodes"] = 1
    return ClusterSpec(**fields)


def parse_spec(cls: type[_Spec], data: dict, *, what: str):
    """Validate `data` as `cls`, turning pydantic's error into one line per bad field."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"invalid {what}: {format_validation_error(exc)}") from None


def format_validation_error(exc: ValidationError) -> str:
    """'field.path: message (got value)' for every error, joined by '; '."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        parts.append(f"{loc}: {msg}{shown}")
    return "; ".join(parts)
