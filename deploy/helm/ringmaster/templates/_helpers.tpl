{{/* Names and labels shared by every template. */}}

{{- define "ringmaster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ringmaster.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ringmaster.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ringmaster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ringmaster
{{- end -}}

{{/* Selector labels; pass (dict "ctx" $ "component" "controller"). */}}
{{- define "ringmaster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ringmaster.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ringmaster.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}
{{- end -}}

{{- define "ringmaster.secretName" -}}
{{- printf "%s-secrets" (include "ringmaster.fullname" .) -}}
{{- end -}}

{{- define "ringmaster.redisName" -}}
{{- printf "%s-redis" (include "ringmaster.fullname" .) -}}
{{- end -}}

{{- define "ringmaster.serviceAccountName" -}}
{{- include "ringmaster.fullname" . -}}
{{- end -}}

{{- define "ringmaster.k8sLauncher" -}}
{{- if eq .Values.launcher.type "kubernetes" -}}true{{- end -}}
{{- end -}}

{{/* Namespaces the Kubernetes launcher creates RayClusters in (JSON list). */}}
{{- define "ringmaster.launcherNamespaces" -}}
{{- $ns := .Values.launcher.kubernetes.namespaces | default (list .Release.Namespace) -}}
{{- toJson (uniq $ns) -}}
{{- end -}}

{{/* The chart Secret is needed for a generated token, the embedded Redis password or an
     external Redis URL given as a plain value. */}}
{{- define "ringmaster.needsSecret" -}}
{{- if or (not .Values.auth.existingSecret) .Values.redis.enabled .Values.redis.external.url -}}true{{- end -}}
{{- end -}}

{{- define "ringmaster.validate" -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) -}}
{{- fail "redis.enabled is false: set redis.external.url or redis.external.existingSecret" -}}
{{- end -}}
{{- if and .Values.redis.enabled (or .Values.redis.external.url .Values.redis.external.existingSecret) -}}
{{- fail "redis.external.* is set while redis.enabled is true: set redis.enabled=false to use an external Redis" -}}
{{- end -}}
{{- if and (ge (int .Values.replicas) 2) (ge (int .Values.podDisruptionBudget.minAvailable) (int .Values.replicas)) -}}
{{- fail (printf "podDisruptionBudget.minAvailable=%v must be below replicas=%v, or no pod could ever be evicted" .Values.podDisruptionBudget.minAvailable .Values.replicas) -}}
{{- end -}}
{{- if and (ne .Values.launcher.type "ray") .Values.launcher.ray.address -}}
{{- fail (printf "launcher.ray.address is set but launcher.type is %q: it would be ignored" .Values.launcher.type) -}}
{{- end -}}
{{- end -}}
