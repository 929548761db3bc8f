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
envoy/sidecar.yaml (charts/chart_test.go checks they are equal after substitution).
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
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options:
              connection_keepalive: {interval: 30s, timeout: 5s}
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
resources (default requests 50m/64Mi, limit 320Mi), logLevel (warning).
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
{{- end -}}

{{- define "patchbay.envoySidecarVolume" -}}
- name: patchbay-envoy-bootstrap
  configMap: {name: {{ required "patchbay.envoySidecarVolume: configMap is required" .configMap }}}
{{- end -}}
