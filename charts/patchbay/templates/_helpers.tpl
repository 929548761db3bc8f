{{/* Full name of the release's objects. */}}
{{- define "patchbay.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "patchbay.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "xds") */}}
{{- define "patchbay.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "patchbay.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "patchbay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "patchbay.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The control plane's own ServiceAccount: the only one the chart's Role is bound to. */}}
{{- define "patchbay.xdsServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-xds" (include "patchbay.fullname" .)) .Values.xds.serviceAccountName -}}
{{- else -}}
{{- default "default" .Values.xds.serviceAccountName -}}
{{- end -}}
{{- end -}}

{{/* The port of a host:port flag value. */}}
{{- define "patchbay.port" -}}
{{- $parts := splitList ":" (toString .) -}}
{{- $port := last $parts -}}
{{- if or (lt (len $parts) 2) (not (regexMatch "^[0-9]+$" $port)) -}}
{{- fail (printf "address %q: want host:port" (toString .)) -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{/* Fully qualified name of one of the release's Services: (dict "root" $ "name" "xds") */}}
{{- define "patchbay.serviceHost" -}}
{{- printf "%s-%s.%s.svc.%s" (include "patchbay.fullname" .root) .name .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{- define "patchbay.xdsAddress" -}}
{{- printf "%s:%s" (include "patchbay.serviceHost" (dict "root" . "name" "xds")) (include "patchbay.port" .Values.xds.listen) -}}
{{- end -}}

{{- define "patchbay.extprocAddress" -}}
{{- printf "%s:%s" (include "patchbay.serviceHost" (dict "root" . "name" "extproc")) (include "patchbay.port" .Values.extproc.listen) -}}
{{- end -}}

{{/* Container securityContext (non-root, read-only root FS, no capabilities). */}}
{{- define "patchbay.securityContext" -}}
{{ toYaml .Values.securityContext }}
{{- end -}}

{{/*
A container's args: the subcommand, then "--flag=value" for every (list "--flag" value)
whose value is set (not "", not 0; booleans always).
*/}}
{{- define "patchbay.args" -}}
{{- $out := list (first .) -}}
{{- range $pair := rest . -}}
{{- $name := index $pair 0 -}}
{{- $v := index $pair 1 -}}
{{- if and (kindIs "float64" $v) (eq (floor $v) $v) }}{{ $v = int64 $v }}{{ end -}}
{{- if or (kindIs "bool" $v) (and $v (ne (toString $v) "0")) -}}
{{- $out = append $out (printf "%s=%v" $name $v) -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/*
The Envoy bootstrap of a role, rendered from the same content as envoy/edge.yaml and
envoy/sidecar.yaml, or with tls.enabled envoy/edge-mtls.yaml and envoy/sidecar-mtls.yaml
(charts/chart_test.go checks they are equal after substitution).
(dict "root" $ "role" "edge"|"sidecar")
*/}}
{{- define "patchbay.envoyBootstrap" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $v := ternary $root.Values.envoy $root.Values.sidecar (eq $role "edge") -}}
{{- $admin := splitList ":" $v.admin -}}
{{- $stats := splitList ":" $v.stats -}}
{{- $otel := splitList ":" $root.Values.tracing.collector -}}
node:
  id: patchbay-{{ $role }}
  cluster: patchbay-{{ $role }}
  metadata:
    patchbay.role: {{ $role }}
admin:
  address:
    socket_address: {address: {{ first $admin | quote }}, port_value: {{ include "patchbay.port" $v.admin }}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services:
      - envoy_grpc: {cluster_name: patchbay_xds}
  lds_config: {ads: {}, resource_api_version: V3}
  cds_config: {ads: {}, resource_api_version: V3}
static_resources:
  listeners:
    - name: patchbay_stats
      ignore_global_conn_limit: true
      address:
        socket_address: {address: {{ first $stats | quote }}, port_value: {{ include "patchbay.port" $v.stats }}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: patchbay_stats
                route_config:
                  name: patchbay_stats
                  virtual_hosts:
                    - name: admin
                      domains: ["*"]
                      routes:
                        - match: {path: /ready}
                          route: {cluster: envoy_admin}
                        - match: {path: /stats/prometheus}
                          route: {cluster: envoy_admin}
                        - match: {prefix: /}
                          direct_response: {status: 404}
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: patchbay_xds
      type: STRICT_DNS
      connect_timeout: 1s
      upstream_connection_options:
        tcp_keepalive: {}
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options:
              connection_keepalive: {interval: 30s, timeout: 5s}
      {{- if $root.Values.tls.enabled }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificate_sds_secret_configs:
              - name: patchbay_tls_certificate
                sds_config:
                  resource_api_version: V3
                  path_config_source:
                    path: /etc/patchbay/sds/tls-certificate.yaml
                    watched_directory: {path: /etc/patchbay/sds}
            combined_validation_context:
              default_validation_context:
                match_typed_subject_alt_names:
                  - san_type: URI
                    matcher: {exact: "spiffe://patchbay.local/role/xds"}
              validation_context_sds_secret_config:
                name: patchbay_trusted_ca
                sds_config:
                  resource_api_version: V3
                  path_config_source:
                    path: /etc/patchbay/sds/validation-context.yaml
                    watched_directory: {path: /etc/patchbay/sds}
      {{- end }}
      load_assignment:
        cluster_name: patchbay_xds
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {address: {{ include "patchbay.serviceHost" (dict "root" $root "name" "xds") | quote }}, port_value: {{ include "patchbay.port" $root.Values.xds.listen }}}
    - name: patchbay_extproc
      type: STRICT_DNS
      connect_timeout: 0.25s
      lb_policy: LEAST_REQUEST
      upstream_connection_options:
        tcp_keepalive: {}
      circuit_breakers:
        thresholds:
          - priority: DEFAULT
            max_connections: 1024
            max_pending_requests: 10000
            max_requests: 100000
            max_retries: 3
      health_checks:
        - timeout: 0.25s
          interval: 1s
          no_traffic_interval: 1s
          unhealthy_threshold: 2
          healthy_threshold: 1
          grpc_health_check: {service_name: envoy.service.ext_proc.v3.ExternalProcessor}
      outlier_detection:
        split_external_local_origin_errors: true
        consecutive_local_origin_failure: 2
        enforcing_consecutive_local_origin_failure: 100
        consecutive_gateway_failure: 2
        enforcing_consecutive_gateway_failure: 100
        interval: 1s
        base_ejection_time: 5s
        max_ejection_percent: 100
      common_lb_config:
        healthy_panic_threshold: {value: 0}
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options:
              connection_keepalive: {interval: 30s, timeout: 5s}
      {{- if $root.Values.tls.enabled }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificate_sds_secret_configs:
              - name: patchbay_tls_certificate
                sds_config:
                  resource_api_version: V3
                  path_config_source:
                    path: /etc/patchbay/sds/tls-certificate.yaml
                    watched_directory: {path: /etc/patchbay/sds}
            combined_validation_context:
              default_validation_context:
                match_typed_subject_alt_names:
                  - san_type: URI
                    matcher: {exact: "spiffe://patchbay.local/role/extproc"}
              validation_context_sds_secret_config:
                name: patchbay_trusted_ca
                sds_config:
                  resource_api_version: V3
                  path_config_source:
                    path: /etc/patchbay/sds/validation-context.yaml
                    watched_directory: {path: /etc/patchbay/sds}
      {{- end }}
      load_assignment:
        cluster_name: patchbay_extproc
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {address: {{ include "patchbay.serviceHost" (dict "root" $root "name" "extproc") | quote }}, port_value: {{ include "patchbay.port" $root.Values.extproc.listen }}}
    - name: patchbay_otel
      type: STRICT_DNS
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {}
      load_assignment:
        cluster_name: patchbay_otel
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {address: {{ first $otel | quote }}, port_value: {{ include "patchbay.port" $root.Values.tracing.collector }}}
    - name: envoy_admin
      type: STATIC
      connect_timeout: 0.25s
      load_assignment:
        cluster_name: envoy_admin
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {address: {{ first $admin | quote }}, port_value: {{ include "patchbay.port" $v.admin }}}
overload_manager:
  refresh_interval: 0.25s
  resource_monitors:
    - name: envoy.resource_monitors.fixed_heap
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig
        max_heap_size_bytes: {{ int64 $v.maxHeapBytes }}
    - name: envoy.resource_monitors.global_downstream_max_connections
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
        max_active_downstream_connections: {{ int64 $v.maxConnections }}
  actions:
    - name: envoy.overload_actions.shrink_heap
      triggers:
        - name: envoy.resource_monitors.fixed_heap
          threshold: {value: 0.95}
    - name: envoy.overload_actions.stop_accepting_requests
      triggers:
        - name: envoy.resource_monitors.fixed_heap
          threshold: {value: 0.98}
layered_runtime:
  layers:
    - name: static
      static_layer:
        envoy.resource_limits.listener.patchbay_{{ $role }}.connection_limit: {{ mulf $v.maxConnections 0.8 | int64 }}
    - name: admin
      admin_layer: {}
{{- end -}}

{{/*
The Envoy sidecar container for a client pod. Add it to a client Deployment's containers
and mount the sidecar bootstrap ConfigMap with "patchbay.envoySidecarVolume":

  containers:
    - name: my-app        # calls http://127.0.0.1:15001/v2/models/<model>/infer
    {{- include "patchbay.envoySidecar" (dict "configMap" "RELEASE-patchbay-envoy-sidecar") | nindent 4 }}
  volumes:
    {{- include "patchbay.envoySidecarVolume" (dict "configMap" "RELEASE-patchbay-envoy-sidecar") | nindent 4 }}

Keys: configMap (required), image (default envoyproxy/envoy:<pinned>), statsPort (15020),
resources (default requests 50m/64Mi, limit 320Mi), logLevel (warning); with tls.enabled
also tlsSecret (the pod's certificate, role sidecar) and sdsConfigMap
(RELEASE-patchbay-envoy-sds), passed to both templates.
*/}}
{{- define "patchbay.envoySidecar" -}}
- name: patchbay-envoy
  image: {{ .image | default "envoyproxy/envoy:v1.40.0" }}
  args: ["-c", "/etc/patchbay-envoy/envoy.yaml", "--service-node", "$(POD_NAME)", "--disable-hot-restart", "--log-level", {{ .logLevel | default "warning" | quote }}]
  env:
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
  ports:
    - {name: envoy-stats, containerPort: {{ .statsPort | default 15020 }}}
  readinessProbe:
    httpGet: {path: /ready, port: envoy-stats}
    periodSeconds: 5
  livenessProbe:
    tcpSocket: {port: envoy-stats}
    periodSeconds: 10
  resources:
    {{- toYaml (.resources | default (dict "requests" (dict "cpu" "50m" "memory" "64Mi") "limits" (dict "memory" "320Mi"))) | nindent 4 }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 101
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities: {drop: [ALL]}
  volumeMounts:
    - {name: patchbay-envoy-bootstrap, mountPath: /etc/patchbay-envoy, readOnly: true}
    {{- if .tlsSecret }}
    - {name: patchbay-envoy-tls, mountPath: /etc/patchbay/tls, readOnly: true}
    - {name: patchbay-envoy-sds, mountPath: /etc/patchbay/sds, readOnly: true}
    {{- end }}
{{- end -}}

{{- define "patchbay.envoySidecarVolume" -}}
- name: patchbay-envoy-bootstrap
  configMap: {name: {{ required "patchbay.envoySidecarVolume: configMap is required" .configMap }}}
{{- if .tlsSecret }}
- name: patchbay-envoy-tls
  secret: {secretName: {{ .tlsSecret | quote }}, defaultMode: 292}   # 0444: Envoy runs as its own user
- name: patchbay-envoy-sds
  configMap: {name: {{ required "patchbay.envoySidecarVolume: sdsConfigMap is required with tlsSecret" .sdsConfigMap }}}
{{- end }}
{{- end -}}


{{/* The Secret holding a part's certificate: (dict "root" $ "component" "xds" "part" .Values.xds) */}}
{{- define "patchbay.tlsSecretName" -}}
{{- default (printf "%s-%s-tls" (include "patchbay.fullname" .root) .component) (dig "tls" "secretName" "" .part) -}}
{{- end -}}

{{/* A part's TLS volume: its Secret, whole (no subPath: updates reach the pod), read-only. */}}
{{- define "patchbay.tlsVolume" -}}
- name: tls
  secret: {secretName: {{ include "patchbay.tlsSecretName" . | quote }}, defaultMode: 288}   # 0440, readable through fsGroup
{{- end -}}

{{/* The SDS files of the mTLS Envoy bootstraps: envoy/sds/*.yaml (chart_test.go checks they are equal). */}}
{{- define "patchbay.envoySDS" -}}
tls-certificate.yaml: |
  resources:
    - "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
      name: patchbay_tls_certificate
      tls_certificate:
        certificate_chain: {filename: /etc/patchbay/tls/tls.crt}
        private_key: {filename: /etc/patchbay/tls/tls.key}
        watched_directory: {path: /etc/patchbay/tls}
validation-context.yaml: |
  resources:
    - "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
      name: patchbay_trusted_ca
      validation_context:
        trusted_ca: {filename: /etc/patchbay/tls/ca.crt}
        watched_directory: {path: /etc/patchbay/tls}
{{- end -}}

{{/*
A cert-manager Certificate for one part: (dict "root" $ "component" "xds" "part" .Values.xds
"role" "xds" "service" "xds"). The Secret it writes is the part's TLS Secret; the URI SAN is
the part's identity; DNS SANs are its Service's names ("service" empty: none).
*/}}
{{- define "patchbay.certificate" -}}
{{- $root := .root -}}
{{- $cm := $root.Values.tls.certManager -}}
{{- if and $root.Values.tls.enabled $cm.enabled }}
---
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: {{ include "patchbay.fullname" $root }}-{{ .component }}
  labels:
    {{- include "patchbay.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  secretName: {{ include "patchbay.tlsSecretName" . | quote }}
  duration: {{ $cm.duration | quote }}
  renewBefore: {{ $cm.renewBefore | quote }}
  privateKey: {algorithm: ECDSA, size: 256, rotationPolicy: Always}
  usages: [server auth, client auth, digital signature]
  uris: ["spiffe://patchbay.local/role/{{ .role }}"]
  {{- if .service }}
  {{- $svc := printf "%s-%s" (include "patchbay.fullname" $root) .service }}
  dnsNames:
    - {{ $svc }}
    - {{ $svc }}.{{ $root.Release.Namespace }}
    - {{ $svc }}.{{ $root.Release.Namespace }}.svc
    - {{ $svc }}.{{ $root.Release.Namespace }}.svc.{{ $root.Values.clusterDomain }}
  {{- end }}
  issuerRef:
    name: {{ required "tls.certManager.issuerRef.name is required with tls.certManager.enabled" $cm.issuerRef.name | quote }}
    kind: {{ $cm.issuerRef.kind | quote }}
    group: {{ $cm.issuerRef.group | quote }}
{{- end }}
{{- end -}}
