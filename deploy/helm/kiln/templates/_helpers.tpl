{{/* The chart's name, truncated to a DNS label. */}}
{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: <release>-<chart> unless the release already holds the chart's name. */}}
{{- define "kiln.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kiln.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiln.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kiln.labels" -}}
helm.sh/chart: {{ include "kiln.chart" . }}
{{ include "kiln.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kiln.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the repository key: the user's, or the one the chart creates. */}}
{{- define "kiln.repositoryKeySecret" -}}
{{- default (printf "%s-repository-key" (include "kiln.fullname" .)) .Values.repositoryApi.existingSecret }}
{{- end }}

{{/* The HPA's metric: the name the bundled Prometheus adapter rule gives it (files/), so the two
     cannot disagree. */}}
{{- define "kiln.queueMetricName" -}}
{{- $rules := .Files.Get "files/prometheus-adapter-rules.yaml" | fromYaml }}
{{- $rule := first $rules.rules }}
{{- required "files/prometheus-adapter-rules.yaml: the rule names no metric (name.as)" $rule.name.as }}
{{- end }}

{{/* Seconds Kubernetes waits after it starts stopping the pod: the preStop sleep, then Triton's
     drain (--exit-timeout-secs), then a margin before SIGKILL. */}}
{{- define "kiln.terminationGracePeriodSeconds" -}}
{{- add .Values.lifecycle.preStopSleepSeconds .Values.triton.exitTimeoutSeconds .Values.lifecycle.terminationMarginSeconds }}
{{- end }}

{{/* Refuses values that would render a pod that cannot start or cannot drain. */}}
{{- define "kiln.checkValues" -}}
{{- if and (has "*" .Values.models) (gt (len .Values.models) 1) }}
{{- fail (printf "models: \"*\" (every model) must be alone, Triton refuses it beside other names; got %v" .Values.models) }}
{{- end }}
{{- $url := .Values.modelRepository.url }}
{{- if and $url (not (or (hasPrefix "s3://" $url) (hasPrefix "gs://" $url))) }}
{{- fail (printf "modelRepository.url must be \"\" (the baked repository), s3://... or gs://..., got %q" $url) }}
{{- end }}
{{- if and (hasPrefix "gs://" $url) .Values.modelRepository.copyToPod }}
{{- fail "modelRepository.copyToPod copies s3:// repositories only: for gs:// set modelRepository.copyToPod=false (Triton reads the bucket; models that read other models' files then fail to load), or use Cloud Storage's S3-compatible endpoint: s3://https://storage.googleapis.com:443/BUCKET/PREFIX with HMAC keys" }}
{{- end }}
{{- if and .Values.repositoryApi.existingSecret (not .Values.repositoryApi.restricted) }}
{{- fail "repositoryApi.existingSecret is set but repositoryApi.restricted is false: the key would be unused" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas (%v) is above autoscaling.maxReplicas (%v)" .Values.autoscaling.minReplicas .Values.autoscaling.maxReplicas) }}
{{- end }}
{{- end }}
