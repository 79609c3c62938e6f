{{/* The chart's name, and the release's full name (both DNS labels). */}}
{{- define "reconciler.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "reconciler.fullname" -}}
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

{{- define "reconciler.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reconciler.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "reconciler.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "reconciler.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "reconciler.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "reconciler.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The ConfigMap of manifests: made by the chart, or the existing one named in values. */}}
{{- define "reconciler.configMapName" -}}
{{- if .Values.manifests.configMap.create }}
{{- printf "%s-manifests" (include "reconciler.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- required "manifests.configMap.name is required when manifests.configMap.create is false" .Values.manifests.configMap.name }}
{{- end }}
{{- end }}

{{/* --attributes: "k:v;k:v", keys sorted so that a re-render gives the same pod template. */}}
{{- define "reconciler.attributes" -}}
{{- $pairs := list }}
{{- range $key := keys .Values.agent.attributes | sortAlpha }}
{{- $pairs = append $pairs (printf "%s:%v" $key (get $.Values.agent.attributes $key)) }}
{{- end }}
{{- join ";" $pairs }}
{{- end }}

{{/* The directory the agent watches, inside the pod. */}}
{{- define "reconciler.manifestsDir" -}}
{{- if eq .Values.manifests.source "gitSync" }}
{{- $sub := trimAll "/" .Values.manifests.gitSync.path }}
{{- if $sub }}{{ printf "/git/current/%s" $sub }}{{ else }}/git/current{{ end }}
{{- else if eq .Values.manifests.source "hostPath" }}
{{- .Values.manifests.hostPath.path }}
{{- else }}
{{- print "/etc/reconciler/manifests" }}
{{- end }}
{{- end }}

{{- define "reconciler.statusDir" -}}
{{- default (printf "%s/status" (trimSuffix "/" .Values.agent.workDir)) .Values.agent.statusDir }}
{{- end }}
