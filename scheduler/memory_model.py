"""MEMO memory planner, level 2: whole layers as blocks, plus embedding and LM head.

MEMO (arXiv 2407.12117, Sec. 4.3) observes that every decoder layer issues the same
memory requests, so its bi-level MIP solves one layer exactly (level 1,
scheduler/memory.py) and then places each layer's memory as a block in a model-wide plan
(level 2). Here one layer's traced tensors (a `RegionProfile`) fall into four kinds:

    saved       born in the forward, last used in the backward (kept for backward)
    output      the layer's output, live until the next layer's backward has used it
    grad_input  the gradient handed to the layer below, live until that one's backward
    transient   born and dead inside the forward, or inside the backward

Level 1 plans a layer's forward and backward (all kinds but grad_input) with
`plan_offsets`, with one side constraint: saved and output tensors stay below S, their
total (they are all live when the forward turns into the backward, so they fill [0, S)
exactly), while transients may use any address that is free at their ops, including
slots in [0, S) of resident tensors not yet born or already freed. The layer is then a
block whose low part [0, S) is held from its forward op to its backward op, and whose
part above S is held only during its forward op (up to the forward's peak) and its
backward op (up to the backward's peak). Level 2 places, on the model's op axis

    0 embed fwd | 1..N layer fwd | N+1 head fwd+bwd | layer N-1 .. 0 bwd | embed bwd

(every backward is two ops: before and from the birth of its gradient hand-off) these
blocks for every layer and the embedding (the parts above S linked S bytes above the
resident part, so a block stays one piece), a gradient hand-off block per backward and
the head's block, again with `plan_offsets`. The lower bound is the
max-live bytes of the unrolled op-level model trace. A profile is affine in the number of
tokens (every size is a * tokens + b, a fact the trace tests check), so one profile,
recorded once per model by workers/memtrace.py and stored as JSON, plans every length
without torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from scheduler.errors import SpecError
from scheduler.memory import MemoryPlan, max_live_bytes, plan_offsets
from scheduler.specs import ModelSpec

PROFILE_VERSION = 2
READABLE_PROFILE_VERSIONS = (1, 2)  # version 1 lacks layer_no_grad, key_value, attention_ops
PROFILES_PATH = Path(__file__).with_name("memory_profiles.json")
KINDS = ("saved", "output", "grad_input", "transient")


@dataclass(frozen=True, kw_only=True)
class TensorProfile:
    """One traced allocation: its size as a function of tokens and its op span."""

    bytes_per_token: int   # a in size = a * tokens + b
    bytes_fixed: int       # b
    first_op: int          # op that allocates it (region-local)
    last_op: int           # last op it is live at, inclusive
    kind: str              # one of KINDS

    def size(self, num_tokens: int) -> int:
        return self.bytes_per_token * num_tokens + self.bytes_fixed


@dataclass(frozen=True, kw_only=True)
class RegionProfile:
    """The activation trace of one region (a layer, the embedding or the head)."""

    tensors: tuple[TensorProfile, ...]   # in allocation order
    num_ops: int                         # ops of forward + backward
    backward_op: int                     # first op of the backward
    fixed_bytes: int                     # parameter-gradient bytes (not activations)
    chunk_tokens: int | None = None      # the region runs in chunks of this many tokens:
                                         # all but its grad_input repeat per chunk
    attention_ops: tuple[int, ...] = ()  # ops of its opaque attention (forward, backward)

    def size(self, tensor: TensorProfile, num_tokens: int) -> int:
        """Bytes of `tensor` when the region runs over `num_tokens` tokens."""
        if self.chunk_tokens is not None and tensor.kind != "grad_input":
            num_tokens = min(num_tokens, self.chunk_tokens)
        return tensor.size(num_tokens)

    def trace(self, num_tokens: int) -> tuple[list[int], list[tuple[int, int]]]:
        """(sizes, lifetimes) at `num_tokens`: the input of `plan_offsets`."""
        return ([self.size(t, num_tokens) for t in self.tensors],
                [(t.first_op, t.last_op) for t in self.tensors])

    def of_kind(self, *kinds: str) -> list[TensorProfile]:
        return [t for t in self.tensors if t.kind in kinds]


@dataclass(frozen=True, kw_only=True)
class ModelMemoryProfile:
    """Activation traces of one model: a decoder layer, the embedding and the head."""

    model: ModelSpec
    layer: RegionProfile
    embedding: RegionProfile
    head: RegionProfile
    recorded_tokens: tuple[int, ...]     # token counts the affine fit was recorded at
    source: str                          # how it was recorded (device, dtype, tool)
    layer_no_grad: RegionProfile | None = None  # a layer's forward under no_grad (StreamBP)
    key_value: RegionProfile | None = None      # K/V projection forward + backward (StreamBP)


@dataclass(frozen=True, kw_only=True)
class RegionBlock:
    """A region's level-1 plan seen as a block: [0, resident) held from its forward to the
    end of its backward; above it, up to `forward_peak` during the forward, `backward_peak`
    during the backward until its gradient hand-off is born (`tail_op`), `tail_peak` from
    then on (so the hand-off can sit where the backward's workspace was)."""

    plan: MemoryPlan          # level 1: every tensor of the region but its grad_input
    resident_bytes: int       # S: saved + output tensors, placed in [0, S)
    forward_peak: int         # highest address live at a forward op
    backward_peak: int        # highest address live at a backward op before tail_op
    tail_peak: int            # highest address live at tail_op or later
    tail_op: int              # first op of the grad_input (num_ops if it has none)


@dataclass(frozen=True, kw_only=True)
class ModelMemoryPlan:
    """Level-1 region plans and the level-2 placement of the whole model."""

    num_tokens: int
    layer: RegionBlock                # level 1 of one decoder layer (all layers share it)
    embedding: RegionBlock            # level 1 of the embedding
    head: MemoryPlan                  # level 1 of the head (one op on the model axis)
    blocks: tuple[str, ...]           # level-2 block names, aligned with `model_plan`
    model_plan: MemoryPlan            # level 2: blocks on the model's op axis
    unrolled_max_live_bytes: int      # lower bound from the op-level model trace

    @property
    def peak_bytes(self) -> int:
        return self.model_plan.peak_bytes

    @property
    def bytes_per_token(self) -> float:
        return self.peak_bytes / self.num_tokens

    @property
    def ratio_to_lower_bound(self) -> float:
        return self.peak_bytes / self.unrolled_max_live_bytes

    def offset_of(self, block: str) -> int:
        """Level-2 address of a named block (e.g. 'layer3.resident')."""
        return self.model_plan.offsets[self.blocks.index(block)]


def plan_layer(region: RegionProfile, num_tokens: int, *,
               time_limit_s: float = 5.0) -> MemoryPlan:
    """Level 1 on a whole region trace (forward and backward as recorded, no constraint)."""
    sizes, lifetimes = region.trace(_check_tokens(num_tokens))
    return plan_offsets(sizes, lifetimes, time_limit_s=time_limit_s)


def plan_region_block(region: RegionProfile, num_tokens: int, *,
                      time_limit_s: float = 5.0) -> RegionBlock:
    """Level 1 with saved and output tensors kept in [0, S) (see the module docstring)."""
    chosen = region.of_kind("saved", "output", "transient")
    sizes = [region.size(t, num_tokens) for t in chosen]
    resident = sum(s for s, t in zip(sizes, chosen, strict=True) if t.kind != "transient")
    ceilings = {k: resident for k, t in enumerate(chosen) if t.kind != "transient"}
    plan = plan_offsets(sizes, [(t.first_op, t.last_op) for t in chosen],
                        time_limit_s=time_limit_s, ceilings=ceilings)
    tail = min((t.first_op for t in region.of_kind("grad_input")), default=region.num_ops)
    tail = max(tail, region.backward_op)
    fwd = bwd = end = resident
    for t, off, size in zip(chosen, plan.offsets, plan.sizes, strict=True):
        if t.first_op < region.backward_op:
            fwd = max(fwd, off + size)
        if t.first_op < tail and t.last_op >= region.backward_op:
            bwd = max(bwd, off + size)
        if t.last_op >= tail:
            end = max(end, off + size)
    return RegionBlock(plan=plan, resident_bytes=resident, forward_peak=fwd, backward_peak=bwd,
                       tail_peak=end, tail_op=tail)


def plan_model(profile: ModelMemoryProfile, num_tokens: int, *, num_layers: int | None = None,
               time_limit_s: float = 5.0) -> ModelMemoryPlan:
    """Bi-level plan of the activations of one forward+backward over `num_tokens`."""
    n = profile.model.num_layers if num_layers is None else num_layers
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_layers={n!r} must be an integer >= 1")
    tokens = _check_tokens(num_tokens)
    layer = plan_region_block(profile.layer, tokens, time_limit_s=time_limit_s)
    embedding = plan_region_block(profile.embedding, tokens, time_limit_s=time_limit_s)
    head = plan_offsets(*_trace_of(profile.head, tokens, "saved", "output", "transient"),
                        time_limit_s=time_limit_s)
    def bwd_ops(i: int) -> tuple[int, int]:   # layer i's backward, -1 is the embedding
        a = n + 2 + 2 * (n - 1 - i)
        return a, a + 1

    blocks = _Blocks()
    blocks.region("embedding", embedding, 0, *bwd_ops(-1))
    for i in range(n):
        blocks.region(f"layer{i}", layer, 1 + i, *bwd_ops(i))
        blocks.add(f"layer{i}.grad_input", _kind_bytes(profile.layer, tokens, "grad_input"),
                   bwd_ops(i)[1], bwd_ops(i - 1)[1])
    blocks.add("head", head.peak_bytes, n + 1, n + 1)
    blocks.add("head.grad_input", _kind_bytes(profile.head, tokens, "grad_input"), n + 1,
               bwd_ops(n - 1)[1])
    model_plan = plan_offsets(blocks.sizes, blocks.spans, time_limit_s=time_limit_s,
                              links=blocks.links)
    return ModelMemoryPlan(
        num_tokens=tokens, layer=layer, embedding=embedding, head=head,
        blocks=tuple(blocks.names), model_plan=model_plan,
        unrolled_max_live_bytes=unrolled_max_live(profile, tokens, num_layers=n))


class _Blocks:
    """Level-2 blocks being collected: names, sizes, op spans and links."""

    def __init__(self):
        self.names: list[str] = []
        self.sizes: list[int] = []
        self.spans: list[tuple[int, int]] = []
        self.links: dict[int, tuple[int, int]] = {}

    def add(self, name: str, size: int, first: int, last: int) -> int:
        self.names.append(name)
        self.sizes.append(size)
        self.spans.append((first, last))
        return len(self.names) - 1

    def region(self, name: str, block: RegionBlock, fwd: int, bwd: int, tail: int) -> None:
        """The resident part over [fwd, tail] and, linked above it, the forward part, the
        backward part and the backward's tail part (from the gradient hand-off's birth)."""
        s = block.resident_bytes
        base = self.add(f"{name}.resident", s, fwd, tail)
        for part, size, op in (("fwd", block.forward_peak, fwd), ("bwd", block.backward_peak, bwd),
                               ("tail", block.tail_peak, tail)):
            self.links[self.add(f"{name}.{part}", size - s, op, op)] = (base, s)


def _trace_of(region: RegionProfile, tokens: int, *kinds: str
              ) -> tuple[list[int], list[tuple[int, int]]]:
    chosen = region.of_kind(*kinds)
    return [region.size(t, tokens) for t in chosen], [(t.first_op, t.last_op) for t in chosen]


def _kind_bytes(region: RegionProfile, tokens: int, kind: str) -> int:
    return sum(region.size(t, tokens) for t in region.of_kind(kind))


def unrolled_max_live(profile: ModelMemoryProfile, num_tokens: int, *,
                      num_layers: int | None = None) -> int:
    """Max-live bytes of the op-level model trace: the lower bound of any placement."""
    return max_live_bytes(*unrolled_trace(profile, num_tokens, num_layers=num_layers))


def unrolled_trace(profile: ModelMemoryProfile, num_tokens: int, *,
                   num_layers: int | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """(sizes, lifetimes) of every tensor of every region on the model's op axis.

    Region ops are laid out as in the module docstring. A saved tensor spans from its op in
    the region's forward to its op in the region's backward; an output stays until the
    region that reads it has finished its backward; a gradient hand-off stays until the
    region below has finished its backward.
    """
    n = profile.model.num_layers if num_layers is None else num_layers
    order = ["embedding"] + [f"layer{i}" for i in range(n)] + ["head"]
    regions = {name: profile.layer if name.startswith("layer") else getattr(profile, name)
               for name in order}
    starts, ends = _region_ops(order, regions)
    sizes, spans = [], []
    for k, name in enumerate(order):
        region, (fwd0, bwd0) = regions[name], starts[name]
        above = order[k + 1] if k + 1 < len(order) else name
        below = order[k - 1] if k > 0 else name
        for t in region.tensors:
            first = _global_op(t.first_op, region, fwd0, bwd0)
            last = _global_op(t.last_op, region, fwd0, bwd0)
            if t.kind == "output":
                last = max(last, ends[above])
            elif t.kind == "grad_input":
                last = max(last, ends[below])
            sizes.append(region.size(t, num_tokens))
            spans.append((first, last))
    return sizes, spans


def placed_trace(profile: ModelMemoryProfile, plan: ModelMemoryPlan
                 ) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """The unrolled model trace with every tensor's absolute address under `plan`.

    Addresses compose the two levels: a region's tensors sit at its block's base plus
    their level-1 offsets; a gradient hand-off fills its own block. What checks a bi-level
    plan end to end (no two live tensors of the whole model share an address).
    """
    n = sum(1 for b in plan.blocks if b.startswith("layer") and b.endswith(".resident"))
    sizes, spans = unrolled_trace(profile, plan.num_tokens, num_layers=n)
    offsets: list[int] = []
    for name in ["embedding"] + [f"layer{i}" for i in range(n)] + ["head"]:
        region = profile.layer if name.startswith("layer") else getattr(profile, name)
        level1 = {"embedding": plan.embedding.plan, "head": plan.head}.get(name, plan.layer.plan)
        base = plan.offset_of("head" if name == "head" else f"{name}.resident")
        local = iter(level1.offsets)
        handoff = plan.offset_of(f"{name}.grad_input") if region.of_kind("grad_input") else 0
        for t in region.tensors:
            if t.kind == "grad_input":
                offsets.append(handoff)
                handoff += region.size(t, plan.num_tokens)
            else:
                offsets.append(base + next(local))
    return sizes, spans, offsets


def _region_ops(order: list[str], regions: dict[str, RegionProfile]
                ) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    """Global first forward op and first backward op of each region, and its last op.

    Forwards run bottom-up, then the head (order[-1]) runs its forward and backward, then
    backwards run top-down.
    """
    fwd0: dict[str, int] = {}
    bwd0: dict[str, int] = {}
    op = 0
    for name in order:
        fwd0[name] = op
        op += regions[name].backward_op
    for name in reversed(order):
        bwd0[name] = op
        op += regions[name].num_ops - regions[name].backward_op
    ends = {name: bwd0[name] + regions[name].num_ops - regions[name].backward_op - 1
            for name in order}
    return {name: (fwd0[name], bwd0[name]) for name in order}, ends


def _global_op(op: int, region: RegionProfile, fwd0: int, bwd0: int) -> int:
    return fwd0 + op if op < region.backward_op else bwd0 + op - region.backward_op


def _check_tokens(num_tokens: int) -> int:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens!r} must be a positive integer")
    return num_tokens


# -- profiles on disk ------------------------------------------------------------------

def profile_to_json(profile: ModelMemoryProfile) -> dict:
    def region(r: RegionProfile) -> dict:
        return {"num_ops": r.num_ops, "backward_op": r.backward_op,
                "fixed_bytes": r.fixed_bytes, "chunk_tokens": r.chunk_tokens,
                "attention_ops": list(r.attention_ops),
                "tensors": [[t.bytes_per_token, t.bytes_fixed, t.first_op, t.last_op, t.kind]
                            for t in r.tensors]}
    out = {"version": PROFILE_VERSION, "model": profile.model.model_dump(),
           "recorded_tokens": list(profile.recorded_tokens), "source": profile.source,
           "layer": region(profile.layer), "embedding": region(profile.embedding),
           "head": region(profile.head)}
    for name in ("layer_no_grad", "key_value"):
        if getattr(profile, name) is not None:
            out[name] = region(getattr(profile, name))
    return out


def profile_from_json(data: dict) -> ModelMemoryProfile:
    if data.get("version") not in READABLE_PROFILE_VERSIONS:
        raise SpecError(f"memory profile version={data.get('version')!r}; this build reads "
                        f"versions {READABLE_PROFILE_VERSIONS} (re-record with workers.memtrace)")

    def region(r: dict) -> RegionProfile:
        tensors = []
        for a, b, first, last, kind in r["tensors"]:
            if kind not in KINDS:
                raise SpecError(f"memory profile tensor kind={kind!r}; valid: {KINDS}")
            tensors.append(TensorProfile(bytes_per_token=a, bytes_fixed=b, first_op=first,
                                         last_op=last, kind=kind))
        return RegionProfile(tensors=tuple(tensors), num_ops=r["num_ops"],
                             backward_op=r["backward_op"], fixed_bytes=r["fixed_bytes"],
                             chunk_tokens=r.get("chunk_tokens"),
                             attention_ops=tuple(r.get("attention_ops", ())))
    optional = {name: region(data[name]) for name in ("layer_no_grad", "key_value")
                if name in data}
    return ModelMemoryProfile(
        model=ModelSpec.model_validate(data["model"]), layer=region(data["layer"]),
        embedding=region(data["embedding"]), head=region(data["head"]),
        recorded_tokens=tuple(data["recorded_tokens"]), source=data["source"], **optional)


def stored_profiles(path: Path = PROFILES_PATH) -> dict[str, ModelMemoryProfile]:
    """Profiles shipped with the package (recorded by `python -m workers.memtrace`)."""
    if not path.exists():
        return {}
    return {name: profile_from_json(d) for name, d in json.loads(path.read_text()).items()}


# Fields that change values but not a single memory request: a layer's trace does not
# depend on them (plans take num_layers from the caller's spec).
_TRACE_FREE_FIELDS = ("num_layers", "rope_theta", "norm_eps", "max_position_embeddings",
                      "sliding_window")


def _trace_key(model: ModelSpec) -> ModelSpec:
    return model.model_copy(update={f: getattr(ModelSpec.model_fields[f], "default", None)
                                    for f in _TRACE_FREE_FIELDS if f != "num_layers"}
                            | {"num_layers": 1})


def find_profile(model: ModelSpec, *, path: Path = PROFILES_PATH) -> ModelMemoryProfile:
    """The stored profile of a model of this shape: the layer count, RoPE base, norm
    epsilon and context length may differ (no memory request depends on them)."""
    key = _trace_key(model)
    for profile in stored_profiles(path).values():
        if _trace_key(profile.model) == key:
            return profile
    raise SpecError(
        f"no memory profile for model {model.model_dump()} in {path}; record one with "
        "`python -m workers.memtrace --model <preset, config.json or model directory>`")


@lru_cache(maxsize=64)
def planned_bytes_per_token(model: ModelSpec, *, num_tokens: int = 65536,
                            time_limit_s: float = 2.0) -> float:
    """Planned activation peak of one forward+backward over `num_tokens`, per token.

    The figure the cost model's `activation_bytes_per_token` takes in place of its
    analytic estimate. Cached: planning is done once per (model, length).
    """
    plan = plan_model(find_profile(model), num_tokens, num_layers=model.num_layers,
                      time_limit_s=time_limit_s)
    return plan.bytes_per_token


def layer_trace(model: ModelSpec, num_tokens: int) -> tuple[list[int], list[tuple[int, int]]]:
    """(sizes, lifetimes) of one decoder layer's forward+backward at `num_tokens`."""
    return find_profile(model).layer.trace(_check_tokens(num_tokens))


def fit_affine(token_counts: Sequence[int], sizes: Sequence[int]) -> tuple[int, int]:
    """Exact integer (a, b) with sizes[k] = a * token_counts[k] + b, or ValueError."""
    if len(token_counts) < 2 or len(set(token_counts)) != len(token_counts):
        raise ValueError(f"token_counts={list(token_counts)} needs >= 2 distinct counts")
    (t0, s0), (t1, s1) = (token_counts[0], sizes[0]), (token_counts[1], sizes[1])
    a, rem = divmod(s1 - s0, t1 - t0)
    b = s0 - a * t0
    if rem or any(a * t + b != s for t, s in zip(token_counts, sizes, strict=True)):
        raise ValueError(f"sizes {list(sizes)} at tokens {list(token_counts)} are not affine "
                         "in the token count")
    return a, b


def planned_bytes_per_token_or_none(model: ModelSpec) -> float | None:
    """`planned_bytes_per_token(model)` if a profile is stored for it, else None (the
    cost model then keeps its analytic estimate)."""
    try:
        return planned_bytes_per_token(model)
    except SpecError:
        return None
