"""Dry run of a job: the plans of its first global batches, as `POST /v1/jobs:plan` shows.

Reads only the dataset's index (sample lengths, scheduler.dataset.read_lengths), forms the
epoch's batches exactly as training will (scheduler.batching.epoch_batches with the job's
seed), and plans each with scheduler.plan_batch under the job's policy and time budget.
Each plan is traced as a `planner.plan_step` span (world size, groups by size, predicted
makespan, lower bound, solver status: "optimal" when the simulated makespan meets the
lower bound, which proves it optimal, else "feasible"). Memory per rank is the memory
model's figure (scheduler/rank_memory.py): model states for the job's precision and
optimizer sharding plus the activation peak of its largest micro-batch under the memory
scheme the plan names for it. A model whose states cannot fit a device is refused first.
"""

from __future__ import annotations

import base64
import io
import json

from opentelemetry import trace

from controller.schemas import BatchPreview, PlanPreview
from controller.spec import JobCreate
from scheduler.errors import SpecError
from scheduler.plan import StepPlan

MAX_PREVIEW_BUDGET_S = 60.0  # num_batches x planner.time_limit_s a preview may spend
GIB = 1024**3


def default_tracer() -> trace.Tracer:
    return trace.get_tracer("controller.api")


def peak_tokens_per_rank(plan: StepPlan) -> list[float]:
    """Per rank, the most tokens it holds in any one micro-batch (version 1: after offload;
    version 2: held on the device or swapped by the group's scheme)."""
    from scheduler.zigzag import local_tokens

    peak = [0.0] * plan.world_size
    for _, group in plan.groups():
        lengths = [s.length for s in group.sequences]
        for j, r in enumerate(group.ranks):
            held = local_tokens(lengths, group.ring_size, j) if plan.version == 2 \
                else group.tokens_per_rank()
            peak[r] = max(peak[r], held)
    return peak


def peak_bytes_per_rank(plan: StepPlan) -> list[int]:
    """Per rank, the predicted device peak over its micro-batches (plan.predicted.groups);
    a rank in no group still holds its model states."""
    peak = [plan.memory.model_state_bytes if plan.memory else 0] * plan.world_size
    if plan.predicted is None:
        raise ValueError("peak_bytes_per_rank needs a plan with its predictions (predicted)")
    groups = [g for _, g in plan.groups()]
    for g, pred in zip(groups, plan.predicted.groups or [], strict=False):
        for r, b in zip(g.ranks, pred.peak_bytes_per_rank, strict=True):
            peak[r] = max(peak[r], b)
    return peak


def groups_by_size(plan: StepPlan) -> dict[str, int]:
    return {str(k): v for k, v in plan.groups_by_size().items()}


def preview_plan(spec: JobCreate, *, num_batches: int = 2, gantt: bool = False,
                 tracer: trace.Tracer | None = None) -> PlanPreview:
    """Plan the first `num_batches` global batches of `spec`'s dataset.

    Extreme model or cluster figures (a 1e300 GiB GPU, a 1e-300 TFLOP/s one) overflow the
    cost model's arithmetic; that is the spec's fault, so it is reported as a SpecError.
    """
    try:
        return _preview(spec, num_batches=num_batches, gantt=gantt, tracer=tracer)
    except ArithmeticError as exc:
        raise SpecError(f"model/resources.cluster: figures out of the range the cost model "
                        f"can compute with ({type(exc).__name__}: {exc})") from None


def _preview(spec: JobCreate, *, num_batches: int, gantt: bool,
             tracer: trace.Tracer | None) -> PlanPreview:
    from controller.planning import job_cost_model
    from scheduler.batching import epoch_batches
    from scheduler.dataset import read_structure

    budget = num_batches * spec.planner.time_limit_s
    if budget > MAX_PREVIEW_BUDGET_S:
        raise SpecError(f"planner.time_limit_s={spec.planner.time_limit_s} x num_batches="
                        f"{num_batches} = {budget:g} s exceeds the preview budget of "
                        f"{MAX_PREVIEW_BUDGET_S:g} s; lower either")
    tracer = tracer or default_tracer()
    structure = read_structure(spec.dataset.path)
    lengths = structure.lengths
    model, cluster = spec.resolve_model(), spec.resolve_cluster()
    cost = job_cost_model(spec)
    cost.memory.check_states_fit()
    capacity = spec.resources.capacity_tokens or cost.capacity_tokens(cluster.world_size)
    batches = epoch_batches(lengths, tokens_per_batch=spec.training.global_batch_tokens,
                            seed=spec.training.seed, units=structure.units())
    out, first_sim = [], None
    for index, ids in enumerate(batches[:num_batches]):
        batch = [int(x) for x in lengths[ids]]
        preview, sim = _plan_one(spec, index, batch, cluster, model, cost, capacity, tracer,
                                 pairs=structure.batch_pairs(ids))
        out.append(preview)
        first_sim = first_sim or sim
    png = gantt_png(out[0].plan, first_sim, title=f"{spec.name}: batch 0") \
        if gantt and out else None
    return PlanPreview(job_name=spec.name, num_samples=int(lengths.size),
                       num_batches_in_epoch=len(batches), capacity_tokens=capacity,
                       world_size=cluster.world_size, batches=out, gantt_png_base64=png)


def _plan_one(spec: JobCreate, index: int, batch: list[int], cluster, model, cost, capacity,
              tracer: trace.Tracer, pairs: list[tuple[int, int]] | None = None):
    from scheduler.planner import plan_batch
    from scheduler.simulator import simulate

    with tracer.start_as_current_span("planner.plan_step") as span:
        plan = plan_batch(batch, cluster, model, policy=spec.planner.policy,
                          capacity_tokens=capacity, time_limit_s=spec.planner.time_limit_s,
                          seed=spec.training.seed, cost=cost, pairs=pairs)
        sim = simulate(plan, cluster, model, cost=cost)
        annotate_plan_span(span, plan, sim, index=index, policy=spec.planner.policy)
    peak = peak_tokens_per_rank(plan)
    return BatchPreview(
        index=index, num_sequences=len(batch), num_tokens=sum(batch), max_length=max(batch),
        groups_by_size=groups_by_size(plan), predicted_step_s=sim.makespan_s,
        lower_bound_s=sim.lower_bound_s, peak_tokens_per_rank=peak,
        peak_memory_gib_per_rank=[b / GIB for b in peak_bytes_per_rank(plan)],
        plan=plan), sim


def solver_status(sim) -> str:
    """'optimal' when the makespan meets the (valid) lower bound, else 'feasible'."""
    return "optimal" if sim.makespan_s <= sim.lower_bound_s * (1 + 1e-9) else "feasible"


def annotate_plan_span(span: trace.Span, plan: StepPlan, sim, *, index: int,
                       policy: str) -> None:
    """The attributes of a `planner.plan_step` span."""
    span.set_attribute("planner.batch_index", index)
    span.set_attribute("planner.policy", policy)
    span.set_attribute("planner.world_size", plan.world_size)
    span.set_attribute("planner.capacity_tokens", plan.capacity_tokens)
    span.set_attribute("planner.groups_by_size", json.dumps(groups_by_size(plan)))
    span.set_attribute("planner.predicted_makespan_s", sim.makespan_s)
    span.set_attribute("planner.lower_bound_s", sim.lower_bound_s)
    span.set_attribute("planner.solver_status", solver_status(sim))


def gantt_png(plan: StepPlan, sim, *, title: str = "") -> str:
    """Base64 PNG of scheduler.gantt's chart: one row per rank, one bar per group run."""
    from scheduler.gantt import draw_gantt

    buf = io.BytesIO()
    draw_gantt(plan, sim, buf, title=title or None, dpi=80)
    return base64.b64encode(buf.getvalue()).decode()
