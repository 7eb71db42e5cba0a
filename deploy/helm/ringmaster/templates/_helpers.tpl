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

{{/* The controller's ServiceAccount (KubeRay's convention). */}}
{{- define "ringmaster.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "ringmaster.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* The Ray pods' ServiceAccount ("" : the namespace's default). */}}
{{- define "ringmaster.workerServiceAccountName" -}}
{{- if .Values.workers.serviceAccount.create -}}
{{- .Values.workers.serviceAccountName | default (printf "%s-worker" (include "ringmaster.fullname" .)) -}}
{{- else -}}
{{- .Values.workers.serviceAccountName -}}
{{- end -}}
{{- end -}}

{{- define "ringmaster.k8sLauncher" -}}
{{- if eq .Values.launcher.type "kuberay" -}}true{{- end -}}
{{- end -}}

{{/* Leader election: more than one replica, or a rolling update (two pods at once). */}}
{{- define "ringmaster.leaderElection" -}}
{{- if or (gt (int .Values.controller.replicas) 1) (eq .Values.controller.strategy "RollingUpdate") -}}true{{- end -}}
{{- end -}}

{{/* The Lease, and the selector-less Service that points at the leader's gRPC port. */}}
{{- define "ringmaster.leaderName" -}}
{{- printf "%s-leader" (include "ringmaster.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- end -}}

{{/* Does the controller call the Kubernetes API (token mounted, egress to the API)? */}}
{{- define "ringmaster.usesKubeApi" -}}
{{- if or (include "ringmaster.k8sLauncher" .) (include "ringmaster.leaderElection" .) -}}true{{- end -}}
{{- end -}}

{{/* What worker pods dial: the controller Service, or the leader's one. */}}
{{- define "ringmaster.controllerAddress" -}}
{{- $svc := ternary (include "ringmaster.leaderName" .) (include "ringmaster.fullname" .) (eq (include "ringmaster.leaderElection" .) "true") -}}
{{- printf "%s.%s.svc:%d" $svc .Release.Namespace (int .Values.controller.grpcPort) -}}
{{- end -}}

{{/* Namespaces the kuberay launcher creates RayClusters in (JSON list). */}}
{{- define "ringmaster.launcherNamespaces" -}}
{{- $ns := .Values.launcher.kuberay.namespaces | default (list .Release.Namespace) -}}
{{- toJson (uniq $ns) -}}
{{- end -}}

{{/* The chart's workers.* block as the launcher reads it (RINGMASTER_K8S_WORKERS). */}}
{{- define "ringmaster.workersJson" -}}
{{- $w := .Values.workers -}}
{{- toJson (dict "resources" $w.resources "nodeSelector" $w.nodeSelector "tolerations" $w.tolerations "affinity" $w.affinity "priorityClassName" $w.priorityClassName "shmSize" $w.shmSize "extraEnv" $w.extraEnv "extraResources" $w.extraResources "serviceAccountName" (include "ringmaster.workerServiceAccountName" .) "jobServiceAccounts" $w.jobServiceAccounts) -}}
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
{{- $c := .Values.controller -}}
{{- if and (ge (int $c.replicas) 2) (ge (int .Values.podDisruptionBudget.minAvailable) (int $c.replicas)) -}}
{{- fail (printf "podDisruptionBudget.minAvailable=%v must be below controller.replicas=%v, or no pod could ever be evicted" .Values.podDisruptionBudget.minAvailable $c.replicas) -}}
{{- end -}}
{{- $le := $c.leaderElection -}}
{{- if not (and (lt (int $le.retryPeriodSeconds) (int $le.renewDeadlineSeconds)) (lt (int $le.renewDeadlineSeconds) (int $le.leaseDurationSeconds))) -}}
{{- fail (printf "controller.leaderElection: need retryPeriodSeconds (%v) < renewDeadlineSeconds (%v) < leaseDurationSeconds (%v), so a leader steps down before a standby may take over" $le.retryPeriodSeconds $le.renewDeadlineSeconds $le.leaseDurationSeconds) -}}
{{- end -}}
{{- $r := .Values.launcher.ray -}}
{{- if and (ne .Values.launcher.type "ray") (or $r.address $r.devLocal) -}}
{{- fail (printf "launcher.ray.address/devLocal are set but launcher.type is %q: they would be ignored" .Values.launcher.type) -}}
{{- end -}}
{{- if and (eq .Values.launcher.type "ray") (not $r.address) (not $r.devLocal) -}}
{{- fail "launcher.type=ray without launcher.ray.address would train inside the CPU-only controller pod: use launcher.type=kuberay for GPU training, give launcher.ray.address, or set launcher.ray.devLocal=true for development" -}}
{{- end -}}
{{- if and $r.address $r.devLocal -}}
{{- fail "launcher.ray.devLocal=true and launcher.ray.address: a local Ray or an existing one, not both" -}}
{{- end -}}
{{- if and $r.devLocal (include "ringmaster.leaderElection" .) -}}
{{- fail "launcher.ray.devLocal runs every job inside one controller pod: it needs controller.replicas=1 and controller.strategy=Recreate" -}}
{{- end -}}
{{- range $what, $img := dict "image" .Values.image "workers.image" .Values.workers.image "redis.image" .Values.redis.image -}}
{{- if and (eq $img.tag "latest") (not $img.digest) -}}
{{- fail (printf "%s.tag=latest is not allowed: a moving tag turns every pod restart into a silent upgrade and makes rollbacks impossible; pin a release (e.g. %q)%s" $what ($what | eq "redis.image" | ternary "7.4.2" "0.1.0") ($what | eq "image" | ternary " or set image.digest" "")) -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) (include "ringmaster.usesKubeApi" .) -}}
{{- fail "serviceAccount.create=false needs serviceAccount.name: the chart grants the launcher's and the leader election's rights to it, never to the namespace's default account" -}}
{{- end -}}
{{- if and .Values.workers.serviceAccount.create (not (include "ringmaster.k8sLauncher" .)) -}}
{{- fail "workers.serviceAccount.create=true only applies to launcher.type=kuberay" -}}
{{- end -}}
{{- if and .Values.kueue.queueName (not (include "ringmaster.k8sLauncher" .)) -}}
{{- fail "kueue.queueName only applies to launcher.type=kuberay (Kueue admits RayClusters)" -}}
{{- end -}}
{{- if and (hasKey .Values.workers.resources "limits") (hasKey (.Values.workers.resources.limits | default dict) .Values.launcher.kuberay.gpuResourceName) -}}
{{- fail (printf "workers.resources.limits.%s: GPUs are requested per rank from each job's gpus_per_node; leave it out" .Values.launcher.kuberay.gpuResourceName) -}}
{{- end -}}
{{- if and (hasKey .Values.workers.resources "requests") (hasKey (.Values.workers.resources.requests | default dict) .Values.launcher.kuberay.gpuResourceName) -}}
{{- fail (printf "workers.resources.requests.%s: GPUs are requested per rank from each job's gpus_per_node; leave it out" .Values.launcher.kuberay.gpuResourceName) -}}
{{- end -}}
{{- end -}}

{{/* The Secret with the controller's TLS certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "ringmaster.tlsSecretName" -}}
{{- .Values.tls.secretName | default (printf "%s-tls" (include "ringmaster.fullname" .)) -}}
{{- end -}}

{{- define "ringmaster.validateTls" -}}
{{- $t := .Values.tls -}}
{{- if and $t.enabled (not $t.secretName) (not $t.certManager.enabled) -}}
{{- fail "tls.enabled: set tls.secretName (a kubernetes.io/tls Secret) or tls.certManager.enabled" -}}
{{- end -}}
{{- if and $t.certManager.enabled (not $t.enabled) -}}
{{- fail "tls.certManager.enabled is set while tls.enabled is false: the certificate would be ignored" -}}
{{- end -}}
{{- if and $t.certManager.enabled (not $t.certManager.issuerRef.name) -}}
{{- fail "tls.certManager.enabled: set tls.certManager.issuerRef.name" -}}
{{- end -}}
{{- end -}}
