"""GET /metrics: job and step metrics in the Prometheus text format, read back with
prometheus_client's own parser; the route needs the API token like every other."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from controller.store import StepMetrics
from tests.controller.harness import DEMO_SPEC


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_expose_jobs_and_their_newest_step(ctl):
    c, store = ctl.client(), ctl.controller.store
    job = c.post("/v1/jobs", json={**DEMO_SPEC, "name": "scraped"}).json()
    for step in range(2):
        store.append_step_metrics(job["id"], StepMetrics(
            step=step, attempt=1, loss=3.25 - step, tokens_per_s=1234.5 * (step + 1),
            predicted_step_s=0.5, measured_step_s=0.75, imbalance=0.125,
            peak_memory_bytes=7 << 20, world_size=3))
    r = c.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(r.text)
    labels = (("job_id", job["id"]), ("job_name", "scraped"))
    assert got[("ringmaster_job_step", labels)] == 2
    assert got[("ringmaster_job_loss", labels)] == 2.25
    assert got[("ringmaster_job_tokens_per_second", labels)] == 2469.0
    assert got[("ringmaster_job_step_seconds", tuple(sorted((*labels, ("kind", "measured")))))
               ] == 0.75
    assert got[("ringmaster_job_step_seconds", tuple(sorted((*labels, ("kind", "predicted")))))
               ] == 0.5
    assert got[("ringmaster_job_peak_memory_bytes", labels)] == 7 << 20
    assert got[("ringmaster_job_world_size", labels)] == 3
    assert got[("ringmaster_job_steps_completed", labels)] == 2
    assert got[("ringmaster_job_steps_total", labels)] == DEMO_SPEC["training"]["steps"]
    pending = got[("ringmaster_jobs_active", (("state", "Pending"),))]
    assert pending >= 1 and got[("ringmaster_jobs_stored", ())] >= 1
    c.post(f"/v1/jobs/{job['id']}:stop")  # finished: its series are gone
    assert ("ringmaster_job_loss", labels) not in samples(c.get("/metrics").text)


def test_metrics_need_the_token(ctl):
    assert ctl.client(token=None).get("/metrics").status_code == 401
    assert ctl.client(token="wrong").get("/metrics").status_code == 401
