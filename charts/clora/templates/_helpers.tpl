{{/* The chart name, overridable. */}}
{{- define "clora.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The object-name prefix: the release name, plus the chart name when the release name lacks it. */}}
{{- define "clora.fullname" -}}
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

{{/* Labels every object carries. */}}
{{- define "clora.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "clora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: clora
{{- end }}

{{/* Labels of the operator's own objects (Deployment, pods, Service, ServiceAccount). */}}
{{- define "clora.operatorLabels" -}}
{{ include "clora.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels that select the operator's pods. */}}
{{- define "clora.selectorLabels" -}}
app.kubernetes.io/name: {{ include "clora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "clora.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "clora.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The kopf peering object's name. */}}
{{- define "clora.peeringName" -}}
{{- default (include "clora.fullname" .) .Values.operator.peering.name }}
{{- end }}

{{/* The operator image: repository:tag, the tag defaulting to <appVersion>-<flavor>. */}}
{{- define "clora.image" -}}
{{- if not (has .Values.image.flavor (list "cpu" "cuda")) }}
{{- fail (printf "image.flavor must be cpu or cuda, not %q" .Values.image.flavor) }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion .Values.image.flavor) .Values.image.tag) }}
{{- end }}

{{/* The default runtime image: runtime.image, falling back to the operator's repository. */}}
{{- define "clora.runtimeImage" -}}
{{- $img := .Values.runtime.image }}
{{- if not (has $img.flavor (list "cpu" "cuda")) }}
{{- fail (printf "runtime.image.flavor must be cpu or cuda, not %q" $img.flavor) }}
{{- end }}
{{- printf "%s:%s" (default .Values.image.repository $img.repository) (default (printf "%s-%s" .Chart.AppVersion $img.flavor) $img.tag) }}
{{- end }}

{{/* Whether the Prometheus operator's API is served (ServiceMonitor/PodMonitor render only then). */}}
{{- define "clora.hasPrometheusOperator" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- end }}
