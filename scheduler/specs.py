"""Model and cluster specs: the two inputs of every cost, memory and plan computation.

Pydantic models (they sit at the edge: job specs embed them, the CLI prints their JSON
Schema), frozen, unknown fields rejected. Presets carry the figures the planner uses; each
cluster figure says where it comes from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scheduler.errors import SpecError
from scheduler.rope import DefaultRope, RopeScaling

DType = Literal["float64", "float32", "float16", "bfloat16"]

DTYPE_BYTES: dict[str, int] = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
# Per-layer lists of every tensor are built from num_layers; far beyond any real model
# (Llama 3.1 405B has 126), a bound keeps an absurd figure a 422, not an allocation.
MAX_LAYERS = 10_000


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ModelType = Literal["llama", "mistral", "qwen2", "qwen3"]
MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")


class ModelSpec(_Spec):
    """A Llama-style decoder: RMSNorm, RoPE, GQA, SwiGLU (docs/models.md).

    One architecture with the options the Hugging Face families need: Llama 2/3/3.1/3.2
    and Mistral are the base; Qwen2/2.5 add a bias to the q/k/v projections; Qwen3 adds a
    per-head RMSNorm on q and k; any of them may tie the LM head to the embedding. The
    fields are exactly what workers.model.Transformer builds; `parameter_numels` lists its
    tensors in order, which is what the memory model counts.
    """

    vocab_size: int = Field(gt=0, description="Number of token ids the embedding and head cover.")
    hidden_size: int = Field(gt=0, description="Width of the residual stream.")
    num_layers: int = Field(gt=0, le=MAX_LAYERS, description="Number of decoder layers.")
    num_heads: int = Field(gt=0, description="Query heads per layer.")
    num_kv_heads: int = Field(gt=0, description="Key/value heads (GQA); divides num_heads.")
    ffn_hidden_size: int = Field(gt=0, description="Inner width of the SwiGLU MLP.")
    if TYPE_CHECKING:
        # What a constructed spec holds: _normalise derives a missing head_dim and
        # _check_heads refuses a spec where it cannot, so no validated spec has None (the
        # checker sees that type; 0 only marks the field optional, the runtime default is None).
        head_dim: int = 0
    else:
        head_dim: int | None = Field(
            default=None, gt=0, description="Width of one attention head; None (the default): "
                                            "hidden_size / num_heads. Qwen3 and Mistral-Nemo "
                                            "set it explicitly (q has num_heads x head_dim "
                                            "features).")
    rope_theta: float = Field(default=10000.0, gt=0, description="RoPE base frequency.")
    rope_scaling: RopeScaling | None = Field(
        default=None, description="Long-context frequency schedule (scheduler.rope): linear, "
                                  "llama3 or yarn; None: plain RoPE.")
    norm_eps: float = Field(default=1e-5, gt=0, description="RMSNorm epsilon.")
    dtype: DType = Field(default="bfloat16", description="Parameter and activation dtype.")
    model_type: ModelType = Field(
        default="llama", description="Hugging Face family the spec is written back as "
                                     "(config.json model_type); fixes which options apply.")
    attention_bias: bool = Field(default=False,
                                 description="Bias on the q, k and v projections (Qwen2; Llama "
                                             "and Qwen3 with attention_bias).")
    attention_out_bias: bool = Field(default=False,
                                     description="Bias on the attention output projection "
                                                 "(Llama and Qwen3 with attention_bias).")
    qk_norm: bool = Field(default=False, description="RMSNorm over each head of q and k before "
                                                     "RoPE (Qwen3).")
    tie_word_embeddings: bool = Field(default=False,
                                      description="The LM head is the embedding matrix (one "
                                                  "tensor, both gradients).")
    max_position_embeddings: int | None = Field(
        default=None, gt=0, description="Context length the model is meant for (written to an "
                                        "exported config.json); informational otherwise.")
    sliding_window: int | None = Field(
        default=None, gt=0, description="The checkpoint's attention window. Ringmaster runs full "
                                        "causal attention, which equals windowed attention only "
                                        "for sequences no longer than the window, so longer "
                                        "sequences are refused.")

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            rope = data.get("rope_scaling")
            if isinstance(rope, DefaultRope) or isinstance(rope, dict) \
                    and rope.get("rope_type") == "default" and len(rope) == 1:
                data["rope_scaling"] = None  # plain RoPE has one spelling: None
            if data.get("head_dim") is None and isinstance(data.get("hidden_size"), int) \
                    and isinstance(data.get("num_heads"), int) and data["num_heads"] > 0 \
                    and data["hidden_size"] % data["num_heads"] == 0:
                data["head_dim"] = data["hidden_size"] // data["num_heads"]
        return data

    @model_validator(mode="after")
    def _check_heads(self) -> ModelSpec:
        if self.num_heads % self.num_kv_heads:
            raise SpecError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )
        if self.head_dim is None:
            raise SpecError(
                f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size} "
                "(or give head_dim)"
            )
        if self.head_dim % 2:
            raise SpecError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        _check_family(self)
        return self

    @property
    def q_dim(self) -> int:
        """Features of q (and of the attention output): num_heads x head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Features of k and of v: num_kv_heads x head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def layer_numels(self) -> list[int]:
        """Elements of one DecoderLayer's parameters, in registration order: attn_norm, wq
        (+bias), wk (+bias), wv (+bias), q_norm, k_norm, wo (+bias), mlp_norm, w_gate, w_up,
        w_down."""
        h, q, kv, f = self.hidden_size, self.q_dim, self.kv_dim, self.ffn_hidden_size
        qkv_bias = self.attention_bias
        out = [h, h * q, *([q] if qkv_bias else []), h * kv, *([kv] if qkv_bias else []),
               h * kv, *([kv] if qkv_bias else [])]
        if self.qk_norm:
            out += [self.head_dim, self.head_dim]
        out += [q * h, *([h] if self.attention_out_bias else []), h, h * f, h * f, f * h]
        return out

    def parameter_numels(self) -> list[int]:
        """Elements of each parameter tensor, in workers.model.Transformer.parameters() order
        (embedding; each layer's `layer_numels`; final norm; head unless tied to the
        embedding, which then counts once)."""
        h = self.hidden_size
        head = [] if self.tie_word_embeddings else [self.vocab_size * h]
        return [self.vocab_size * h, *self.layer_numels() * self.num_layers, h, *head]

    @property
    def num_params(self) -> int:
        """Exact parameter count of workers.model.Transformer for this spec."""
        return sum(self.parameter_numels())

    def check_sequence_length(self, length: int, *, where: str = "sequence") -> None:
        """SpecError if a sequence of `length` tokens would need the sliding window."""
        if self.sliding_window is not None and length > self.sliding_window:
            raise SpecError(
                f"{where} of {length} tokens is longer than the model's sliding_window="
                f"{self.sliding_window}: Ringmaster runs full causal attention, which equals "
                "the checkpoint's windowed attention only up to the window; shorten the "
                "sequences or use a checkpoint without a sliding window (docs/models.md)")

    def with_overrides(self, **fields) -> ModelSpec:
        """A copy with `fields` replaced (a job spec's rope_theta / rope_scaling), validated."""
        return parse_spec(ModelSpec, {**self.model_dump(), **fields},
                          what="model spec (with overrides)")

    @classmethod
    def from_hf_config(cls, source: str | Path | dict, *, dtype: DType | None = None) -> ModelSpec:
        """Build from a Hugging Face config.json (a path, a model directory, or its dict) of a
        Llama, Mistral, Qwen2 or Qwen3 model; refuses, by name, any config field that would
        change the math and is not implemented here (scheduler.hf_config)."""
        from scheduler.hf_config import spec_from_hf_config

        return spec_from_hf_config(source, dtype=dtype)

    def to_hf_config(self, base: dict | None = None) -> dict:
        """The config.json of this spec (on top of `base`, the source model's config)."""
        from scheduler.hf_config import hf_config_from_spec

        return hf_config_from_spec(self, base=base)


def _check_family(spec: ModelSpec) -> None:
    """Each model_type expresses only some options; refuse a spec its config.json cannot say."""
    t = spec.model_type
    if spec.qk_norm and t != "qwen3":
        raise SpecError(f"qk_norm=true is the Qwen3 architecture; model_type={t!r} has no q/k "
                        "norm (set model_type='qwen3')")
    if t == "qwen3" and not spec.qk_norm:
        raise SpecError("model_type='qwen3' has q/k norms: qk_norm must be true")
    if t == "qwen2" and not (spec.attention_bias and not spec.attention_out_bias):
        raise SpecError("model_type='qwen2' has a bias on q/k/v and none on the output: "
                        "attention_bias must be true and attention_out_bias false")
    if t == "mistral" and (spec.attention_bias or spec.attention_out_bias):
        raise SpecError("model_type='mistral' has no attention biases")
    if t in ("llama", "qwen3") and spec.attention_bias != spec.attention_out_bias:
        raise SpecError(f"model_type={t!r} has one attention_bias flag for q, k, v and the "
                        "output: attention_bias and attention_out_bias must be equal")


# Figures of one kind of node: what a ClusterSpec holds for a uniform cluster and a
# NodePool holds for one pool of a heterogeneous one.
HARDWARE_FIELDS = ("gpu_memory_gib", "achieved_tflops", "intra_node_bandwidth_gbps",
                   "inter_node_bandwidth_gbps", "pcie_bandwidth_gbps", "host_memory_gib",
                   "memory_bandwidth_gbps")


class _Nodes(_Spec):
    """Machines of one kind and the figures of each rank on them (HARDWARE_FIELDS): what
    a uniform ClusterSpec holds, and each NodePool of a heterogeneous one."""

    num_nodes: int = Field(gt=0, description="Number of machines.")
    gpus_per_node: int = Field(gt=0, description="Accelerators (ranks) per machine.")
    gpu_memory_gib: float = Field(gt=0, description="Device memory per rank, GiB.")
    achieved_tflops: float = Field(gt=0, description="Achieved dense TFLOP/s per rank.")
    intra_node_bandwidth_gbps: float = Field(
        gt=0, description="Per-rank per-direction bandwidth inside a node, GB/s (NVLink).")
    inter_node_bandwidth_gbps: float = Field(
        gt=0, description="Per-rank per-direction bandwidth across nodes, GB/s (NIC; a link "
                          "between two pools runs at the slower NIC).")
    pcie_bandwidth_gbps: float = Field(
        gt=0, description="Host<->device copy bandwidth per rank, GB/s (offload).")
    host_memory_gib: float = Field(gt=0, description="Host memory per node, GiB.")
    memory_bandwidth_gbps: float = Field(
        default=2000.0, gt=0,
        description="Achieved device-memory bandwidth per rank, GB/s (the optimizer update).")


class NodePool(_Nodes):
    """Nodes of one kind in a heterogeneous cluster (docs/planner.md, "Heterogeneous
    clusters"): `preset` fills every figure not given (an h100 pool, an a100 pool, ...)."""

    preset: str | None = Field(
        default=None, description="Cluster preset whose per-GPU figures the pool takes "
                                  "(h100, a100, a800, cpu); fields given here override them.")
    gpu: str = Field(default="", description="GPU model, for people (default: the preset's "
                                             "name).")

    @model_validator(mode="before")
    @classmethod
    def _from_preset(cls, data):
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        name = data["preset"]
        if name not in CLUSTER_PRESETS:
            raise SpecError(f"preset={name!r} is not a cluster preset; valid: "
                            f"{', '.join(CLUSTER_PRESETS)}")
        base = {k: v for k, v in CLUSTER_PRESETS[name].items() if v is not None}
        return {**base, "gpu": name, **data}

    @property
    def num_ranks(self) -> int:
        return self.num_nodes * self.gpus_per_node


class ClusterSpec(_Nodes):
    """The hardware a job runs on, as the cost model sees it (per-GPU achieved figures).

    A uniform cluster gives the figures directly. A heterogeneous one lists `pools` (ranks
    numbered pool by pool, node by node); the cluster's own figures are then derived from
    them: `achieved_tflops` is the fastest pool's (the cost model's reference rank; the
    others run at `rank_speeds`), every other figure the smallest pool's (what every rank
    can count on). Each rank's memory and speed come from its own pool (`pool_of`,
    `pool_cluster`). Pools share `gpus_per_node` (the topology's nodes are uniform).
    """

    pools: tuple[NodePool, ...] | None = Field(
        default=None, min_length=1,
        description="Node pools of a heterogeneous cluster, in rank order (the fields above "
                    "are then derived from them).")

    @model_validator(mode="before")
    @classmethod
    def _derive_from_pools(cls, data):
        if not isinstance(data, dict) or not data.get("pools"):
            return data
        pools = []
        for i, p in enumerate(data["pools"]):
            try:
                pools.append(p if isinstance(p, NodePool)
                             else NodePool.model_validate(p, strict=True))
            except ValidationError as exc:
                raise SpecError(f"pools[{i}]: {format_validation_error(exc)}") from None
        gpn = {p.gpus_per_node for p in pools}
        if len(gpn) > 1:
            raise SpecError(f"pools: gpus_per_node differs between pools ({sorted(gpn)}); "
                            "every pool needs the same gpus_per_node (uniform nodes)")
        derived = {"num_nodes": sum(p.num_nodes for p in pools),
                   "gpus_per_node": pools[0].gpus_per_node,
                   "achieved_tflops": max(p.achieved_tflops for p in pools)}
        for name in HARDWARE_FIELDS:
            derived.setdefault(name, min(getattr(p, name) for p in pools))
        for name, value in derived.items():
            given = data.get(name)
            if given is None:
                continue
            if isinstance(given, bool) or not isinstance(given, int | float):
                raise SpecError(f"{name}={given!r} is not a number (and with pools, leave "
                                f"{name} out: it is derived from them)")
            if not math.isclose(given, value, rel_tol=1e-9):
                raise SpecError(f"{name}={given!r} contradicts the pools ({value!r} derived "
                                f"from them); with pools, leave {name} out")
        return {**data, **derived, "pools": tuple(pools)}

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    @property
    def heterogeneous(self) -> bool:
        """Whether ranks differ in memory or speed (more than one distinct pool)."""
        return self.pools is not None and len({_figures(p) for p in self.pools}) > 1

    def pool_of(self, rank: int) -> int:
        """Index of the pool `rank` belongs to (0 for a uniform cluster)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside the cluster (valid 0.."
                             f"{self.world_size - 1})")
        node = self.node_of(rank)
        for i, p in enumerate(self.pools or ()):
            if node < p.num_nodes:
                return i
            node -= p.num_nodes
        return 0

    def rank_pools(self) -> tuple[int, ...]:
        """`pool_of` of every rank, in rank order."""
        if self.pools is None:
            return (0,) * self.world_size
        return tuple(i for i, p in enumerate(self.pools) for _ in range(p.num_ranks))

    def pool_cluster(self, index: int) -> ClusterSpec:
        """A uniform ClusterSpec with pool `index`'s figures (the whole cluster's size): what
        the memory model of that pool's ranks sees."""
        if self.pools is None:
            return self
        pool = self.pools[index]
        return ClusterSpec(num_nodes=self.num_nodes, gpus_per_node=self.gpus_per_node,
                           **{name: getattr(pool, name) for name in HARDWARE_FIELDS})

    def rank_speeds(self) -> tuple[float, ...]:
        """Each rank's achieved TFLOP/s over the reference (`achieved_tflops`): 1.0 on a
        uniform cluster, below 1 for the ranks of slower pools."""
        if self.pools is None:
            return (1.0,) * self.world_size
        per_pool = [p.achieved_tflops / self.achieved_tflops for p in self.pools]
        return tuple(per_pool[i] for i in self.rank_pools())


def _figures(pool: NodePool) -> tuple:
    return tuple(getattr(pool, name) for name in HARDWARE_FIELDS)


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
#   ~64 GB/s raw, ~50 GB/s achieved; DGX H100 has 2 TiB host memory; HBM3 3.35 TB/s peak,
#   ~2.7 TB/s achieved by streaming kernels (the optimizer update).
# - a800: 80 GiB HBM2e; ~200 TFLOP/s bf16 achieved (64% of 312 peak, MEMO's setting);
#   NVLink capped at 400 GB/s bidirectional (200 per direction); 200 Gb/s NIC per GPU =
#   25 GB/s; PCIe Gen4 ~25 GB/s achieved; 1 TiB host memory; HBM2e 2.0 TB/s peak, ~1.6
#   achieved.
# - a100: 80 GiB HBM2e; ~125 TFLOP/s bf16 dense achieved (40% of the 312 TFLOP/s SXM
#   peak, the same MFU as h100); NVLink 3 is 600 GB/s bidirectional, 300 per direction;
#   one 200 Gb/s HDR NIC per GPU = 25 GB/s; PCIe Gen4 x16 ~25 GB/s achieved; DGX A100 has
#   1 TiB host memory; HBM2e 2.0 TB/s peak, ~1.6 achieved.
# - cpu: this 2-core machine, measured roughly: ~0.05 TFLOP/s fp32 matmul, loopback gloo
#   ~2 GB/s, memcpy ~5 GB/s (also the memory bandwidth); 24 GiB memory split as 12
#   "device" + 12 host. One node holds every rank (gpus_per_node None: as many as asked).
CLUSTER_PRESETS: dict[str, dict] = {
    "h100": dict(gpus_per_node=8, gpu_memory_gib=80.0, achieved_tflops=400.0,
                 intra_node_bandwidth_gbps=450.0, inter_node_bandwidth_gbps=50.0,
                 pcie_bandwidth_gbps=50.0, host_memory_gib=2048.0,
                 memory_bandwidth_gbps=2700.0),
    "a100": dict(gpus_per_node=8, gpu_memory_gib=80.0, achieved_tflops=125.0,
                 intra_node_bandwidth_gbps=300.0, inter_node_bandwidth_gbps=25.0,
                 pcie_bandwidth_gbps=25.0, host_memory_gib=1024.0,
                 memory_bandwidth_gbps=1600.0),
    "a800": dict(gpus_per_node=8, gpu_memory_gib=80.0, achieved_tflops=200.0,
                 intra_node_bandwidth_gbps=200.0, inter_node_bandwidth_gbps=25.0,
                 pcie_bandwidth_gbps=25.0, host_memory_gib=1024.0,
                 memory_bandwidth_gbps=1600.0),
    "cpu": dict(gpus_per_node=None, gpu_memory_gib=12.0, achieved_tflops=0.05,
                intra_node_bandwidth_gbps=2.0, inter_node_bandwidth_gbps=1.0,
                pcie_bandwidth_gbps=5.0, host_memory_gib=12.0, memory_bandwidth_gbps=5.0),
}


def model_preset(name: str) -> ModelSpec:
    """A model preset by name, or a ModelSpec from a HF config.json path or model directory."""
    if name in MODEL_PRESETS:
        return MODEL_PRESETS[name]
    if name.endswith(".json") or Path(name).is_dir():
        return ModelSpec.from_hf_config(name)
    raise SpecError(
        f"model={name!r} is not a preset ({', '.join(MODEL_PRESETS)}), a config.json path or "
        "a model directory"
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
