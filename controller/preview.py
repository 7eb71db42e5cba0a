"""Dry run of a job: the plans of its first global batches, as `POST /v1/jobs:plan` shows.

Reads only the dataset's index (sample lengths, scheduler.dataset.read_lengths), forms the
epoch's batches exactly as training will (scheduler.batching.epoch_batches with the job's
seed), and plans each with scheduler.plan_batch under the job's policy and time budget.
Each plan is traced as a `planner.plan_step` span (world size, groups by size, predicted
makespan, lower bound, solver status). Memory per rank is the cost model's figure: model
states (ZeRO-3 sharded) plus the activations of the most tokens the rank holds in one
micro-batch (ByteScale Eq. 3 after offload).
"""

from __future__ import annotations

import base64
import io
from collections import Counter

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
    """Per rank, the most tokens it holds in any one micro-batch (after offload)."""
    peak = [0.0] * plan.world_size
    for _, group in plan.groups():
        held = group.tokens_per_rank()
        for r in group.ranks:
            peak[r] = max(peak[r], held)
    return peak


def groups_by_size(plan: StepPlan) -> dict[str, int]:
    sizes = Counter(g.ring_size for _, g in plan.groups())
    return {str(k): v for k, v in sorted(sizes.items())}


def preview_plan(spec: JobCreate, *, num_batches: int = 2, gantt: bool = False,
                 tracer: trace.Tracer | None = None) -> PlanPreview:
    """Plan the first `num_batches` global batches of `spec`'s dataset."""
    from scheduler import plan_batch
    from scheduler.batching import epoch_batches
    from scheduler.cost import STATE_BYTES_PER_PARAM, CostModel
    from scheduler.dataset import read_lengths

    budget = num_batches * spec.planner.time_limit_s
    if budget > MAX_PREVIEW_BUDGET_S:
        raise SpecError(f"planner.time_limit_s={spec.planner.time_limit_s} x num_batches="
                        f"{num_batches} = {budget:g} s exceeds the preview budget of "
                        f"{MAX_PREVIEW_BUDGET_S:g} s; lower either")
    tracer = tracer or default_tracer()
    lengths = read_lengths(spec.dataset.path)
    model, cluster = spec.resolve_model(), spec.resolve_cluster()
    cost = CostModel(model, cluster)
    capacity = spec.resources.capacity_tokens or cost.capacity_tokens(cluster.world_size)
    batches = epoch_batches(lengths, tokens_per_batch=spec.training.global_batch_tokens,
                            seed=spec.training.seed)
    states_gib = STATE_BYTES_PER_PARAM * model.num_params / cluster.world_size / GIB
    out = []
    for index, ids in enumerate(batches[:num_batches]):
        batch = [int(x) for x in lengths[ids]]
        with tracer.start_as_current_span("planner.plan_step") as span:
            plan = plan_batch(batch, cluster, model, policy=spec.planner.policy,
                              capacity_tokens=capacity, time_limit_s=spec.planner.time_limit_s,
                              seed=spec.training.seed)
            _annotate(span, plan, index)
        peak = peak_tokens_per_rank(plan)
        out.append(BatchPreview(
            index=index, num_sequences=len(batch), num_tokens=sum(batch),
            max_length=max(batch), groups_by_size=groups_by_size(plan),
            predicted_step_s=plan.predicted.makespan_s if plan.predicted else 0.0,
            lower_bound_s=plan.predicted.lower_bound_s if plan.predicted else 0.0,
            peak_tokens_per_rank=peak,
            peak_memory_gib_per_rank=[states_gib + t * cost.activation_bytes_per_token / GIB
                                      for t in peak],
            plan=plan))
    png = _gantt_png(out[0].plan, cluster, model) if gantt and out else None
    return PlanPreview(job_name=spec.name, num_samples=int(lengths.size),
                       num_batches_in_epoch=len(batches), capacity_tokens=capacity,
                       world_size=cluster.world_size, batches=out, gantt_png_base64=png)


def _annotate(span: trace.Span, plan: StepPlan, index: int) -> None:
    span.set_attribute("planner.batch_index", index)
    span.set_attribute("planner.world_size", plan.world_size)
    span.set_attribute("planner.groups_by_size", str(groups_by_size(plan)))
    if plan.predicted is not None:
        span.set_attribute("planner.predicted_makespan_s", plan.predicted.makespan_s)
        span.set_attribute("planner.lower_bound_s", plan.predicted.lower_bound_s)
    status = getattr(plan, "solver_status", None)
    span.set_attribute("planner.solver_status", str(status) if status else "n/a")


def _gantt_png(plan: StepPlan, cluster, model) -> str:
    from scheduler import gantt_figure

    fig = gantt_figure(plan, cluster, model)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return base64.b64encode(buf.getvalue()).decode()
