{{/* Environment of the controller container: token, Redis, launcher, OpenTelemetry. */}}
{{- define "ringmaster.controllerEnv" -}}
- name: RINGMASTER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.auth.existingSecret | default (include "ringmaster.secretName" .) }}
      key: {{ ternary .Values.auth.existingSecretKey "token" (ne .Values.auth.existingSecret "") }}
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "ringmaster.secretName" . }}
      key: redis-password
- name: REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:%d/0" (include "ringmaster.redisName" .) (int .Values.redis.port) | quote }}
{{- else }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.redis.external.existingSecret }}
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretKey }}
      {{- else }}
      name: {{ include "ringmaster.secretName" . }}
      key: redis-url
      {{- end }}
{{- end }}
{{- if .Values.launcher.ray.address }}
- name: RAY_ADDRESS
  value: {{ .Values.launcher.ray.address | quote }}
{{- end }}
{{- if include "ringmaster.leaderElection" . }}
{{- $le := .Values.controller.leaderElection }}
- name: RINGMASTER_LEADER_ELECTION_LEASE
  value: {{ include "ringmaster.leaderName" . | quote }}
- name: RINGMASTER_LEADER_ELECTION_NAMESPACE
  value: {{ .Release.Namespace | quote }}
- name: RINGMASTER_LEADER_SERVICE
  value: {{ include "ringmaster.leaderName" . | quote }}
- name: RINGMASTER_LEADER_ELECTION_LEASE_DURATION_S
  value: {{ $le.leaseDurationSeconds | quote }}
- name: RINGMASTER_LEADER_ELECTION_RENEW_DEADLINE_S
  value: {{ $le.renewDeadlineSeconds | quote }}
- name: RINGMASTER_LEADER_ELECTION_RETRY_PERIOD_S
  value: {{ $le.retryPeriodSeconds | quote }}
- name: RINGMASTER_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: RINGMASTER_POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}
{{- if include "ringmaster.k8sLauncher" . }}
{{- $k := .Values.launcher.kuberay }}
- name: RINGMASTER_K8S_NAMESPACES
  value: {{ include "ringmaster.launcherNamespaces" . | fromJsonArray | join "," | quote }}
- name: RINGMASTER_K8S_IMAGE
  value: {{ printf "%s:%s" .Values.workers.image.repository .Values.workers.image.tag | quote }}
- name: RINGMASTER_K8S_RAY_VERSION
  value: {{ $k.rayVersion | quote }}
- name: RINGMASTER_K8S_GPU_RESOURCE
  value: {{ $k.gpuResourceName | quote }}
- name: RINGMASTER_K8S_HEAD_RESOURCES
  value: {{ toJson $k.headResources | quote }}
- name: RINGMASTER_K8S_READY_TIMEOUT_S
  value: {{ $k.readyTimeoutSeconds | quote }}
- name: RINGMASTER_K8S_MAX_GPUS
  value: {{ $k.maxGpus | quote }}
- name: RINGMASTER_K8S_CPUS_PER_RANK
  value: {{ $k.cpusPerRank | quote }}
- name: RINGMASTER_K8S_HOST_MEMORY_FRACTION
  value: {{ $k.hostMemoryFraction | quote }}
- name: RINGMASTER_K8S_VOLUMES
  value: {{ toJson .Values.storage.volumes | quote }}
- name: RINGMASTER_K8S_WORKERS
  value: {{ include "ringmaster.workersJson" . | quote }}
- name: RINGMASTER_K8S_KUEUE_QUEUE
  value: {{ .Values.kueue.queueName | quote }}
- name: RINGMASTER_K8S_IMAGE_PULL_SECRETS
  value: {{ join "," .Values.imagePullSecrets | quote }}
- name: RINGMASTER_K8S_OWNER
  value: {{ include "ringmaster.fullname" . | quote }}
- name: RINGMASTER_CONTROLLER_ADDRESS
  value: {{ include "ringmaster.controllerAddress" . | quote }}
{{- end }}
{{- include "ringmaster.otelEnv" . }}
{{- with .Values.controller.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "ringmaster.otelEnv" -}}
{{- $o := .Values.otel }}
{{- if not $o.enabled }}
- name: OTEL_SDK_DISABLED
  value: "true"
{{- else }}
- name: OTEL_SERVICE_NAME
  value: {{ $o.serviceName | quote }}
{{- if $o.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $o.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $o.protocol | quote }}
{{- end }}
- name: OTEL_TRACES_EXPORTER
  value: {{ ternary "otlp" "none" (ne $o.endpoint "") | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $o.tracesSampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $o.tracesSamplerArg | quote }}
{{- if $o.resourceAttributes }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ $o.resourceAttributes | quote }}
{{- end }}
{{- end }}
{{- end -}}
