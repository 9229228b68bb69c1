{{/* Names */}}
{{- define "tether.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tether.fullname" -}}
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

{{/* "<fullname>-<component>", e.g. include "tether.component" (list . "controller") */}}
{{- define "tether.component" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "tether.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels */}}
{{- define "tether.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: tether
{{ include "tether.selectorLabels" . }}
{{- end -}}

{{- define "tether.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "tether.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "tether.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Secrets and where each setting comes from */}}
{{- define "tether.authSecret" -}}
{{- default (include "tether.component" (list . "auth")) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "tether.postgresSecret" -}}
{{- default (include "tether.component" (list . "postgresql")) .Values.postgresql.existingSecret -}}
{{- end -}}

{{/* The chart's Secret for external connection URLs given inline in values. */}}
{{- define "tether.connectionSecret" -}}
{{- include "tether.component" (list . "connections") -}}
{{- end -}}

{{/* TETHER_DATABASE_URL (and PGPASSWORD, which libpq reads, for the in-cluster server). */}}
{{- define "tether.databaseEnv" -}}
{{- if .Values.postgresql.enabled }}
- name: TETHER_DATABASE_URL
  value: {{ printf "postgresql://%s@%s:5432/%s" .Values.postgresql.username (include "tether.component" (list . "postgresql")) .Values.postgresql.database | quote }}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "tether.postgresSecret" . }}
      key: postgres-password
{{- else if .Values.externalDatabase.existingSecret }}
- name: TETHER_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalDatabase.existingSecret }}
      key: {{ .Values.externalDatabase.existingSecretKey }}
{{- else if .Values.externalDatabase.url }}
- name: TETHER_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "tether.connectionSecret" . }}
      key: database-url
{{- else }}
{{- fail "postgresql.enabled is false: set externalDatabase.url or externalDatabase.existingSecret" }}
{{- end }}
{{- end -}}

{{/* TETHER_BROKER_URL: the in-cluster Redis or the external broker. */}}
{{- define "tether.brokerEnv" -}}
{{- if .Values.redis.enabled }}
- name: TETHER_BROKER_URL
  value: {{ printf "redis://%s:6379/0" (include "tether.component" (list . "redis")) | quote }}
{{- else if .Values.externalBroker.existingSecret }}
- name: TETHER_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalBroker.existingSecret }}
      key: {{ .Values.externalBroker.existingSecretKey }}
{{- else if .Values.externalBroker.url }}
- name: TETHER_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "tether.connectionSecret" . }}
      key: broker-url
{{- else }}
{{- fail "redis.enabled is false: set externalBroker.url or externalBroker.existingSecret" }}
{{- end }}
{{- end -}}

{{- define "tether.adminTokenEnv" -}}
- name: TETHER_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "tether.authSecret" . }}
      key: admin-token
{{- end -}}

{{- define "tether.bootstrapTokenEnv" -}}
- name: TETHER_BOOTSTRAP_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "tether.authSecret" . }}
      key: bootstrap-token
{{- end -}}

{{/* A value kept across upgrades: the one in the live Secret, else the given one, else random. */}}
{{- define "tether.persistentSecretValue" -}}
{{- $root := index . 0 -}}{{- $secret := index . 1 -}}{{- $key := index . 2 -}}{{- $given := index . 3 -}}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace $secret -}}
{{- if $given -}}
{{- $given -}}
{{- else if and $existing (hasKey $existing.data $key) -}}
{{- index $existing.data $key | b64dec -}}
{{- else -}}
{{- randAlphaNum 40 -}}
{{- end -}}
{{- end -}}

{{- define "tether.controllerAddress" -}}
{{- printf "%s.%s.svc:%d" (include "tether.component" (list . "controller")) .Release.Namespace (int .Values.controller.service.port) -}}
{{- end -}}

{{/* The Secret holding the controller's tls.crt, tls.key and ca.crt (given, cert-manager's or generated). */}}
{{- define "tether.tlsSecret" -}}
{{- default (printf "%s-tls" (include "tether.component" (list . "controller"))) .Values.controller.tls.secretName -}}
{{- end -}}

{{/* The names the controller's certificate is valid for: its Service in the cluster, then what devices dial. */}}
{{- define "tether.controllerDNSNames" -}}
{{- $svc := include "tether.component" (list . "controller") -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) -}}
{{- concat $names .Values.controller.tls.dnsNames | uniq | toJson -}}
{{- end -}}

{{/* The Kopf peering object the operator replicas meet in (empty: one standalone operator). */}}
{{- define "tether.peering" -}}
{{- if gt (int .Values.operator.replicas) 1 -}}
{{- include "tether.component" (list . "operator") -}}
{{- end -}}
{{- end -}}
