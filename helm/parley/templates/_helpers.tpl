{{/*
Names. Kubernetes names are capped at 63 characters; component suffixes are
added after truncation to 50 so "-group-fanout" (13) still fits.
*/}}
{{- define "parley.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "parley.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "parley.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "parley.labels" -}}
helm.sh/chart: {{ include "parley.chart" . }}
app.kubernetes.io/name: {{ include "parley.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: parley
{{- end }}

{{/*
Per-component labels and selector. Argument: dict "root" $ "component" NAME.
The selector never changes across chart versions (selectors are immutable).
*/}}
{{- define "parley.componentLabels" -}}
{{ include "parley.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "parley.selectorLabels" -}}
app.kubernetes.io/name: {{ include "parley.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The five Kafka consumer services that run as Deployments: values key ->
component name, which is also the binary name in the image.
*/}}
{{- define "parley.backends" -}}
presence: presence
messageStore: message-store
receipt: receipt
groupFanout: group-fanout
push: push
{{- end }}

{{/* Every component: values key -> name (the gateway included). */}}
{{- define "parley.components" -}}
gateway: gateway
{{ include "parley.backends" . }}
{{- end }}

{{- define "parley.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "parley.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The chart-managed Secret (JWT key and/or Mongo URI). */}}
{{- define "parley.secretName" -}}
{{- include "parley.fullname" . }}
{{- end }}

{{/* True (non-empty) when the chart must create its own Secret. */}}
{{- define "parley.needsSecret" -}}
{{- if or (not .Values.auth.existingSecret) (not .Values.mongo.existingSecret) (include "parley.pushSecretInChart" .) }}true{{ end }}
{{- end }}

{{/* True (non-empty) when the push HMAC key goes into the chart's Secret. */}}
{{- define "parley.pushSecretInChart" -}}
{{- with .Values.pushNotifications }}{{ if and .url .secret (not .existingSecret) }}true{{ end }}{{ end }}
{{- end }}

{{/* The push workload's PARLEY_PUSH_SECRET (when push is on). Argument: the root. */}}
{{- define "parley.pushSecretEnv" -}}
{{- with .Values.pushNotifications }}
{{- if .url }}
- name: PARLEY_PUSH_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ default (include "parley.secretName" $) .existingSecret }}
      key: {{ ternary .existingSecretKey "PARLEY_PUSH_SECRET" (not (empty .existingSecret)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* image reference for a component. Argument: dict "root" $ "c" VALUES. */}}
{{- define "parley.image" -}}
{{- $img := mergeOverwrite (deepCopy .root.Values.image) (default (dict) .c.image) }}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion ($img.tag | toString) | toString) }}
{{- end }}

{{- define "parley.imagePullPolicy" -}}
{{- $img := mergeOverwrite (deepCopy .root.Values.image) (default (dict) .c.image) }}
{{- $img.pullPolicy }}
{{- end }}

{{/*
Pod template annotations: scrape hints, and checksums of the configuration
so that a changed setting rolls the pods (the services read their
environment only at start). Argument: dict "root" $ "c" VALUES "port" N.
*/}}
{{- define "parley.podAnnotations" -}}
checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
{{- if include "parley.needsSecret" .root }}
checksum/secret-inputs: {{ printf "%s|%s|%s" (toString .root.Values.auth.jwtSecret) (toString .root.Values.mongo.uri) (toString .root.Values.pushNotifications.secret) | sha256sum }}
{{- end }}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with (default .root.Values.podAnnotations .c.podAnnotations) }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The pod-level part shared by every component. Argument:
dict "root" $ "c" VALUES "component" NAME.
*/}}
{{- define "parley.podCommon" -}}
serviceAccountName: {{ include "parley.serviceAccountName" .root }}
# The services never call the Kubernetes API.
automountServiceAccountToken: false
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ .c.terminationGracePeriodSeconds }}
{{- with (default .root.Values.nodeSelector .c.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default .root.Values.tolerations .c.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default .root.Values.affinity .c.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .root.Values.topologySpread.enabled }}
topologySpreadConstraints:
  - maxSkew: {{ .root.Values.topologySpread.maxSkew }}
    topologyKey: {{ .root.Values.topologySpread.topologyKey }}
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "parley.selectorLabels" (dict "root" .root "component" .component) | nindent 8 }}
{{- end }}
volumes:
  # The root filesystem is read-only; a small scratch /tmp for any library
  # that wants one (none is known to).
  - name: tmp
    emptyDir:
      sizeLimit: 16Mi
{{- if and (eq .component "gateway") (include "parley.jwksSource" .root) }}
{{- include "parley.jwksVolume" .root | nindent 2 }}
{{- end }}
{{- with .root.Values.kafka.security }}
{{- if .passwordSecret }}
  - name: kafka-sasl
    secret:
      secretName: {{ .passwordSecret }}
      items:
        - key: {{ .passwordKey }}
          path: password
{{- end }}
{{- if .tlsSecret }}
  - name: kafka-tls
    secret:
      secretName: {{ .tlsSecret }}
{{- end }}
{{- end }}
{{- if .root.Values.mongo.tlsSecret }}
  - name: mongo-tls
    secret:
      secretName: {{ .root.Values.mongo.tlsSecret }}
{{- end }}
{{- end }}

{{/* Every container's mounts of the Kafka and MongoDB credentials (as
directories, so a rotated Secret reaches the pod). Argument: the root. */}}
{{- define "parley.secretMounts" -}}
{{- if .Values.kafka.security.passwordSecret }}
- name: kafka-sasl
  mountPath: /etc/parley/kafka-sasl
  readOnly: true
{{- end }}
{{- if .Values.kafka.security.tlsSecret }}
- name: kafka-tls
  mountPath: /etc/parley/kafka-tls
  readOnly: true
{{- end }}
{{- if .Values.mongo.tlsSecret }}
- name: mongo-tls
  mountPath: /etc/parley/mongo-tls
  readOnly: true
{{- end }}
{{- end }}

{{/*
Environment every container gets besides the ConfigMap: the secrets.
Argument: dict "root" $ "jwt" BOOL.
*/}}
{{- define "parley.secretEnv" -}}
- name: PARLEY_MONGO_URI
  valueFrom:
    secretKeyRef:
      name: {{ default (include "parley.secretName" .root) .root.Values.mongo.existingSecret }}
      key: {{ ternary .root.Values.mongo.existingSecretKey "PARLEY_MONGO_URI" (not (empty .root.Values.mongo.existingSecret)) }}
{{- if and .jwt .root.Values.auth.hs256 }}
- name: PARLEY_JWT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ default (include "parley.secretName" .root) .root.Values.auth.existingSecret }}
      key: {{ ternary .root.Values.auth.existingSecretKey "PARLEY_JWT_SECRET" (not (empty .root.Values.auth.existingSecret)) }}
{{- end }}
{{- if .jwt }}
{{- with .root.Values.auth }}
{{- if include "parley.jwksSource" $.root }}
- name: PARLEY_JWT_JWKS_FILE
  value: {{ printf "/etc/parley/jwks/%s" .jwks.key | quote }}
{{- end }}
{{- if .issuer }}
- name: PARLEY_JWT_ISSUER
  value: {{ .issuer | quote }}
{{- end }}
{{- if .audience }}
- name: PARLEY_JWT_AUDIENCE
  value: {{ .audience | quote }}
{{- end }}
- name: PARLEY_JWT_LEEWAY_S
  value: {{ .leewaySeconds | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* "secret" or "configMap" when a JWKS is configured, else empty. */}}
{{- define "parley.jwksSource" -}}
{{- if .Values.auth.jwks.existingSecret }}secret{{ else if .Values.auth.jwks.existingConfigMap }}configMap{{ end }}
{{- end }}

{{/* The gateway's JWKS volume (a directory: updates reach it in place). */}}
{{- define "parley.jwksVolume" -}}
{{- $src := include "parley.jwksSource" . }}
{{- if eq $src "secret" -}}
- name: jwks
  secret:
    secretName: {{ .Values.auth.jwks.existingSecret }}
    items:
      - key: {{ .Values.auth.jwks.key }}
        path: {{ .Values.auth.jwks.key }}
{{- else if eq $src "configMap" -}}
- name: jwks
  configMap:
    name: {{ .Values.auth.jwks.existingConfigMap }}
    items:
      - key: {{ .Values.auth.jwks.key }}
        path: {{ .Values.auth.jwks.key }}
{{- end }}
{{- end }}

{{/* Cross-field checks the schema cannot express. */}}
{{- define "parley.validate" -}}
{{- with .Values.kafka.security }}
{{- if and (hasPrefix "sasl_" .protocol) (not (and .saslMechanism .username .passwordSecret)) }}
{{- fail (printf "kafka.security.protocol %s needs saslMechanism, username and passwordSecret: the services refuse to start otherwise" .protocol) }}
{{- end }}
{{- end }}
{{- if and (not .Values.auth.hs256) (not (include "parley.jwksSource" .)) }}
{{- fail "auth.hs256 is false but no auth.jwks.existingSecret or existingConfigMap is set: the gateway would have no key to check tokens with" }}
{{- end }}
{{- with .Values.pushNotifications }}
{{- if and .url (not .secret) (not .existingSecret) }}
{{- fail "pushNotifications.url is set but neither pushNotifications.secret nor existingSecret: the push service refuses to start without the signing key" }}
{{- end }}
{{- end }}
{{- if and .Values.auth.jwks.existingSecret .Values.auth.jwks.existingConfigMap }}
{{- fail "set auth.jwks.existingSecret or auth.jwks.existingConfigMap, not both" }}
{{- end }}
{{- if le (int64 .Values.config.idleMs) (int64 .Values.config.pingMs) }}
{{- fail (printf "config.idleMs (%v) must exceed config.pingMs (%v): the gateway refuses to start otherwise" .Values.config.idleMs .Values.config.pingMs) }}
{{- end }}
{{- if ge (int .Values.gateway.preStopSleepSeconds) (int .Values.gateway.terminationGracePeriodSeconds) }}
{{- fail "gateway.preStopSleepSeconds must be shorter than gateway.terminationGracePeriodSeconds, or the gateway is killed before it can close its connections" }}
{{- end }}
{{- range $key, $name := include "parley.components" . | fromYaml }}
{{- $c := index $.Values $key }}
{{- if and $c.autoscaling.enabled (gt (int64 $c.autoscaling.minReplicas) (int64 $c.autoscaling.maxReplicas)) }}
{{- fail (printf "%s.autoscaling.minReplicas exceeds maxReplicas" $key) }}
{{- end }}
{{- end }}
{{- end }}
