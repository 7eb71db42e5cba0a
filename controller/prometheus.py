"""`GET /metrics`: the controller's jobs and their newest step, in the Prometheus text format.

A `prometheus_client` collector reads the job store at scrape time, so every replica
answers the same and nothing is lost across a controller restart: the store holds the
figures, this module only formats them. Per scrape it reads the active jobs (one pipelined
round trip for their records and newest step metrics), never the whole history:

    ringmaster_jobs_active{state}                      active jobs by state
    ringmaster_jobs_stored                             jobs in the store (any state)
    ringmaster_job_info{job_id,job_name,state,reason}  1 per active job
    ringmaster_job_attempt{job_id,job_name}            attempts started
    ringmaster_job_steps_completed{job_id,job_name}    optimizer steps done
    ringmaster_job_steps_total{job_id,job_name}        training.steps
    ringmaster_job_step{job_id,job_name}               the newest recorded step (1-based)
    ringmaster_job_loss{...}                           its loss
    ringmaster_job_tokens_per_second{...}              its throughput (all ranks)
    ringmaster_job_step_seconds{...,kind}              measured | predicted step time
    ringmaster_job_step_imbalance{...}                 max rank busy / mean - 1
    ringmaster_job_peak_memory_bytes{...}              the largest rank's peak
    ringmaster_job_world_size{...}                     ranks its world had (elastic)

plus the controller process's own `process_*` and `python_info` series. The route needs
the API token like every other (docs/api.md); the Helm chart's ServiceMonitor sends it
from the token Secret (docs/deploy.md). A job's series end when it finishes; its history
stays in `GET /v1/jobs/{id}/metrics`.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest

from controller.states import State
from controller.store import JobStore, StepMetrics

__all__ = ["CONTENT_TYPE", "JobCollector", "make_registry", "render"]

# The classic text format every Prometheus version scrapes (all our names are plain).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

JOB_LABELS = ["job_id", "job_name"]
_STEP_GAUGES = (  # name, help, StepMetrics field
    ("ringmaster_job_loss", "Loss of the job's newest recorded step.", "loss"),
    ("ringmaster_job_tokens_per_second", "Tokens per second of the newest step, all ranks.",
     "tokens_per_s"),
    ("ringmaster_job_step_imbalance", "Max rank busy time / mean - 1 of the newest step.",
     "imbalance"),
    ("ringmaster_job_peak_memory_bytes", "The largest rank's peak memory in the newest step.",
     "peak_memory_bytes"),
    ("ringmaster_job_world_size", "Ranks the newest step ran on (fewer than the job's while "
     "a lost rank is out of the world, docs/elastic.md).", "world_size"),
)


class JobCollector:
    """Reads `store` at every scrape (see the module docstring)."""

    def __init__(self, store: JobStore):
        self.store = store

    def describe(self):
        return []  # collected lazily: the registry must not scrape the store at register

    def collect(self):
        jobs = self.store.active_records()
        newest = self.store.newest_step_metrics([j.id for j in jobs])
        by_state = Counter(j.state.value for j in jobs)
        active = GaugeMetricFamily("ringmaster_jobs_active", "Active jobs by state.",
                                   labels=["state"])
        for state in State:
            if not state.terminal:
                active.add_metric([state.value], by_state.get(state.value, 0))
        yield active
        yield GaugeMetricFamily("ringmaster_jobs_stored", "Jobs in the store, any state.",
                                value=self.store.count())
        yield from _job_families(jobs)
        yield from _step_families(jobs, newest)


def _job_families(jobs):
    info = GaugeMetricFamily("ringmaster_job_info", "1 for every active job.",
                             labels=[*JOB_LABELS, "state", "reason"])
    families = {name: GaugeMetricFamily(name, text, labels=JOB_LABELS) for name, text in (
        ("ringmaster_job_attempt", "Attempts started so far."),
        ("ringmaster_job_steps_completed", "Optimizer steps done."),
        ("ringmaster_job_steps_total", "Optimizer steps the job trains (training.steps)."))}
    for j in jobs:
        labels = [j.id, j.spec.name]
        info.add_metric([*labels, j.state.value, j.reason], 1)
        families["ringmaster_job_attempt"].add_metric(labels, j.attempt)
        families["ringmaster_job_steps_completed"].add_metric(labels, j.steps_completed)
        families["ringmaster_job_steps_total"].add_metric(labels, j.spec.training.steps)
    return [info, *families.values()]


def _step_families(jobs, newest: dict[str, StepMetrics]):
    step = GaugeMetricFamily("ringmaster_job_step", "The newest recorded step (1-based).",
                             labels=JOB_LABELS)
    seconds = GaugeMetricFamily("ringmaster_job_step_seconds", "Step time of the newest "
                                "step: measured (slowest rank) or predicted by the plan.",
                                labels=[*JOB_LABELS, "kind"])
    gauges = [(GaugeMetricFamily(name, text, labels=JOB_LABELS), field)
              for name, text, field in _STEP_GAUGES]
    for j in jobs:
        m = newest.get(j.id)
        if m is None:
            continue
        labels = [j.id, j.spec.name]
        step.add_metric(labels, m.step + 1)
        seconds.add_metric([*labels, "measured"], m.measured_step_s)
        seconds.add_metric([*labels, "predicted"], m.predicted_step_s)
        for family, field in gauges:
            family.add_metric(labels, float(getattr(m, field)))
    return [step, seconds, *(f for f, _ in gauges)]


def make_registry(store: JobStore) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(store))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
