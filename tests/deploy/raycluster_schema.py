"""A JSON Schema of KubeRay's `ray.io/v1` RayCluster, written for these tests.

Written by hand from the KubeRay v1 API reference (RayClusterSpec, HeadGroupSpec,
WorkerGroupSpec, AutoscalerOptions, AuthOptions, ScaleStrategy); it is not a copy of the
operator's generated CRD. It covers every field of those types as the reference lists
them (KubeRay 1.x), with their types, the required ones and the enums. Objects are closed
(`additionalProperties: false`): the API server prunes, or with strict field validation
rejects, fields a structural schema does not list, so a misspelt or misplaced field must
fail the test instead of vanishing in the cluster. Pod templates are not described here:
the tests check them against Kubernetes' own PodTemplate schema (kubernetes-validate).
"""

from __future__ import annotations

INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
ANY_OBJECT = {"type": "object"}  # described by Kubernetes' own schemas (or free-form)
POD_TEMPLATE = {"type": "object"}  # checked with kubernetes-validate's PodTemplate


def _closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    out = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = list(required)
    return out


AUTOSCALER_OPTIONS = _closed({
    "resources": ANY_OBJECT,
    "image": {"type": "string"},
    "imagePullPolicy": {"type": "string", "enum": ["Always", "Never", "IfNotPresent"]},
    "securityContext": ANY_OBJECT,
    "idleTimeoutSeconds": INT32,
    "upscalingMode": {"type": "string", "enum": ["Default", "Aggressive", "Conservative"]},
    "version": {"type": "string", "enum": ["v1", "v2"]},
    "env": {"type": "array", "items": ANY_OBJECT},
    "envFrom": {"type": "array", "items": ANY_OBJECT},
    "volumeMounts": {"type": "array", "items": ANY_OBJECT},
})

HEAD_GROUP_SPEC = _closed({
    "template": POD_TEMPLATE,
    "headService": ANY_OBJECT,
    "enableIngress": {"type": "boolean"},
    "resources": STRING_MAP,
    "labels": STRING_MAP,
    "rayStartParams": STRING_MAP,
    "serviceType": {"type": "string"},
}, required=("template",))

WORKER_GROUP_SPEC = _closed({
    "suspend": {"type": "boolean"},
    "groupName": {"type": "string", "minLength": 1},
    "replicas": {**INT32, "minimum": 0},
    "minReplicas": {**INT32, "minimum": 0},
    "maxReplicas": {**INT32, "minimum": 0},
    "idleTimeoutSeconds": INT32,
    "resources": STRING_MAP,
    "labels": STRING_MAP,
    "rayStartParams": STRING_MAP,
    "template": POD_TEMPLATE,
    "scaleStrategy": _closed({"workersToDelete": {"type": "array",
                                                  "items": {"type": "string"}}}),
    "numOfHosts": {**INT32, "minimum": 1},
}, required=("groupName", "template"))

RAYCLUSTER_SPEC = _closed({
    "authOptions": _closed({"mode": {"type": "string", "enum": ["disabled", "token"]}}),
    "upgradeStrategy": _closed({"type": {"type": "string", "enum": ["Recreate", "None"]}}),
    "autoscalerOptions": AUTOSCALER_OPTIONS,
    "headServiceAnnotations": STRING_MAP,
    "enableInTreeAutoscaling": {"type": "boolean"},
    "gcsFaultToleranceOptions": ANY_OBJECT,
    "headGroupSpec": HEAD_GROUP_SPEC,
    "rayVersion": {"type": "string"},
    "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP_SPEC},
    "managedBy": {"type": "string"},
    "suspend": {"type": "boolean"},
}, required=("headGroupSpec",))

RAYCLUSTER_V1 = _closed({
    "apiVersion": {"const": "ray.io/v1"},
    "kind": {"const": "RayCluster"},
    "metadata": _closed({
        "name": {"type": "string", "maxLength": 63,
                 "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        "ownerReferences": {"type": "array", "items": ANY_OBJECT},
    }, required=("name",)),
    "spec": RAYCLUSTER_SPEC,
}, required=("apiVersion", "kind", "metadata", "spec"))
