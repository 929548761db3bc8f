package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/patchbay-io/patchbay/internal/runtimetune"
	"github.com/patchbay-io/patchbay/internal/telemetry"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/xds"
	"github.com/patchbay-io/patchbay/xds/endpointslice"
	"github.com/patchbay-io/patchbay/xds/kube"
	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// xdsDefaults: the control plane's live heap is the translated config (about 50 KiB per
// model of 5 versions, docs/capacity.md), and its memory is what limits how many models one
// replica holds, so the GC percent stays at Go's 100 (a higher one trades memory for the
// GC share of a reload), with a soft memory limit at 90% of the container's.
var xdsDefaults = runtimetune.Defaults{GCPercent: 100, LimitFraction: 0.9}

func runXDS(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("xds", "[flags]", "The xDS control plane: watches the rollouts and serves their config over ADS to Envoy\n(edge and sidecar), ext_proc routers and proxyless gRPC clients. The rollouts come from\nthe files in --rollouts DIR (--source files, one replica, state in --state-file) or from\nRollout resources in --namespace (--source kubernetes: any number of replicas, state in\neach Rollout's status; endpoints NAME.NAMESPACE.svc[.cluster.local]:PORT resolve from\nthe Service's EndpointSlices, ready endpoints only).")
	var (
		source     = fs.String("source", sourceFiles, "where rollouts and state live: files (--rollouts, --state-file) or kubernetes (Rollout resources in --namespace)")
		namespace  = fs.String("namespace", "", "kubernetes: the namespace of the Rollouts (default: the pod's own namespace, else \"default\")")
		kubeconfig = fs.String("kubeconfig", "", "kubernetes: kubeconfig file (default: $KUBECONFIG, else the in-cluster ServiceAccount)")
		dir        = fs.String("rollouts", "", "files: directory of rollout files to watch (required)")
		listen     = fs.String("listen", "127.0.0.1:18000", "ADS gRPC address (Envoy, proxyless gRPC, ext_proc)")
		admin      = fs.String("admin", "127.0.0.1:18001", "admin HTTP address: /readyz /metrics /status, rollback API")
		edge       = fs.String("edge-listener", "127.0.0.1:10000", "address of the edge Envoy listener emitted to edge nodes")
		sidecar    = fs.String("sidecar-listener", "127.0.0.1:15001", "address of the outbound listener emitted to sidecar nodes")
		tokenFile  = fs.String("admin-token-file", "", "file holding the bearer token (at least 32 bytes) of the rollback API; re-read when it changes (unset: only an mTLS operator identity may mutate)")
		allowEmpty = fs.Bool("allow-empty", false, "apply a reload that finds no rollout at all (default: refused, keeping every model served)")
		settle     = fs.Duration("settle", 100*time.Millisecond, "how long the rollout files must stay unchanged before they are applied (a file still being written is never applied half-written; 0: apply at once)")
		tlsCert    = fs.String("tls-cert", "", "PEM certificate served on the ADS and admin ports (re-read when it changes)")
		tlsKey     = fs.String("tls-key", "", "PEM key of --tls-cert")
		clientCA   = fs.String("client-ca", "", "PEM CA bundle: client certificates required and verified on both ports; a client's role then follows its certificate's URI SAN (spiffe://patchbay.local/role/<role>)")
		peerRoles  = stringsFlag{}
		extprocTO  = fs.Duration("extproc-timeout", translate.DefaultTimeout, "ext_proc message timeout emitted to Envoy (fail open after it)")
		accessLog  = fs.Bool("access-log", true, "emit an Envoy stdout access log with the routing decision")
		upTLSCA    = fs.String("upstream-tls-ca", "", "PEM CA bundle, as Envoy sees it, that model hosts' certificates chain to; needed by --upstream-tls and by versions with tls: true (Envoy re-reads it when its directory changes)")
		upTLSCert  = fs.String("upstream-tls-cert", "", "PEM client certificate, as Envoy sees it, that Envoy presents to model hosts over TLS")
		upTLSKey   = fs.String("upstream-tls-key", "", "PEM key of --upstream-tls-cert, as Envoy sees it")
		upTLSAll   = fs.Bool("upstream-tls", false, "Envoy's clusters to every model version originate TLS (default: only versions with tls: true)")
		edgeCert   = fs.String("edge-tls-cert", "", "PEM certificate, as Envoy sees it, served by the edge listener (TLS on the edge)")
		edgeKey    = fs.String("edge-tls-key", "", "PEM key of --edge-tls-cert, as Envoy sees it")
		edgeCA     = fs.String("edge-client-ca", "", "PEM CA bundle, as Envoy sees it: the edge listener requires and verifies client certificates")
		vHealth    = fs.Duration("version-health-interval", translate.HealthCheckInterval, "how often the control plane probes each version with a share on each endpoint (REST ready path, gRPC health service of the version) and lends an unhealthy version's slots to the model's healthy versions until it recovers (0: off)")
		ctRetry    = fs.Duration("contract-retry", xds.DefaultContractRetry, "how often a version held by its model's contract (its OIP metadata breaks it or cannot be read) is read again")
		ctWait     = fs.Duration("contract-wait", xds.DefaultContractWait, "at start, how long ADS waits for the first contract check of every contracted version (a breaking version then never gets a request); versions still unread after it are served as written until read (0: no wait)")
		dnsRefresh = fs.Duration("dns-refresh", 5*time.Second, "how often endpoint host names are re-resolved")
		debounce   = fs.Duration("debounce", 10*time.Millisecond, "quiet time after a file event before reloading")
		stateFile  = fs.String("state-file", "", "file that keeps each model's slot map across restarts (recommended; unset: splits are laid out afresh on restart)")
		logLevel   = fs.String("log-level", "info", "debug, info, warn or error")
		gcPercent  = fs.String("gc-percent", strconv.Itoa(xdsDefaults.GCPercent), "GC percent (as GOGC; off: no GC but at the memory limit); precedence: this flag, then $GOGC, then the default")
		memLimit   = fs.String("memory-limit", "auto", "soft memory limit of the Go runtime, e.g. 2GiB, or none; auto: 90% of the container's memory limit (cgroup) if it has one, else none; precedence: this flag, then $GOMEMLIMIT, then auto")
	)
	fs.Var(&peerRoles, "peer-role", "URI=role: give client certificates with this URI SAN a role (edge, sidecar, grpc, extproc, operator); repeatable")
	if err := parseFlags(fs, args, stdout, stderr); err != nil {
		return err
	}
	roles := map[string]string{}
	for _, pr := range peerRoles {
		uri, role, err := xds.ParsePeerRole(pr)
		if err != nil {
			return fmt.Errorf("%w: %w", errUsage, err)
		}
		roles[uri] = role
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("xds: unexpected arguments %q: %w", fs.Args(), errUsage)
	}
	switch *source {
	case sourceFiles:
		if *dir == "" {
			fs.Usage()
			return fmt.Errorf("xds: --rollouts DIR is required with --source files: %w", errUsage)
		}
		if *namespace != "" || *kubeconfig != "" {
			return fmt.Errorf("xds: --namespace and --kubeconfig are for --source kubernetes: %w", errUsage)
		}
	case sourceKubernetes:
		if *dir != "" || *stateFile != "" {
			return fmt.Errorf("xds: --rollouts and --state-file are for --source files (with kubernetes, rollouts are Rollout resources and the state is in their status): %w", errUsage)
		}
	default:
		return fmt.Errorf("xds: --source %q: want files or kubernetes: %w", *source, errUsage)
	}
	topts := translate.Options{
		EdgeAddress: *edge, SidecarAddress: *sidecar, ExtprocTimeout: *extprocTO, AccessLog: *accessLog,
		UpstreamTLS:    translate.TLSFiles{CA: *upTLSCA, Cert: *upTLSCert, Key: *upTLSKey},
		AllUpstreamTLS: *upTLSAll,
		EdgeTLS:        translate.TLSFiles{Cert: *edgeCert, Key: *edgeKey, CA: *edgeCA},
	}
	if err := translate.CheckOptions(topts); err != nil {
		return fmt.Errorf("xds: %w: %w", errUsage, err)
	}
	log, err := telemetry.NewLogger(stderr, *logLevel)
	if err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	tune, err := runtimeSettings(fs, *gcPercent, *memLimit, xdsDefaults)
	if err != nil {
		return fmt.Errorf("xds: %v: %w", err, errUsage)
	}
	tune.Apply()
	log.Info().Str("runtime", tune.String()).Msg("runtime settings")
	if *settle <= 0 {
		*settle = -1 // apply at once
	}
	if *ctWait <= 0 {
		*ctWait = -1 // serve ADS at once
	}
	metrics, err := telemetry.NewMetrics(telemetry.Service("patchbay-xds"))
	if err != nil {
		return err
	}
	defer metrics.Shutdown(context.Background())
	cfg := xds.Config{
		RolloutsDir:    *dir,
		Translate:      topts,
		AdminTokenFile: *tokenFile,
		AllowEmpty:     *allowEmpty,
		Settle:         *settle,
		TLS:            tlsfiles.Files{Cert: *tlsCert, Key: *tlsKey, CA: *clientCA},
		PeerRoles:      roles,
		StateFile:      *stateFile,
		DNSRefresh:     *dnsRefresh,
		VersionHealth:  *vHealth,
		ContractRetry:  *ctRetry,
		ContractWait:   *ctWait,
		Debounce:       *debounce,
		Logger:         log,
		Metrics:        metrics,
	}
	var src *kube.Source
	// srvRef is the server once built: an EndpointSlice change before then is seen by
	// its first resolution anyway.
	var srvRef atomic.Pointer[xds.Server]
	if *source == sourceKubernetes {
		resolveNow := func() {
			if s := srvRef.Load(); s != nil {
				s.ResolveNow()
			}
		}
		if src, err = kubernetesSource(ctx, &cfg, *kubeconfig, *namespace, *dnsRefresh, resolveNow); err != nil {
			return fmt.Errorf("xds: %w", err)
		}
	}
	srv, err := xds.New(cfg)
	if err != nil {
		return err
	}
	srvRef.Store(srv)
	if src != nil {
		// The Source watches from srv.Run on: srv is set before it calls back.
		src.OnRollbackRequest(rollbackRequests(srv, cfg.Store))
	}
	gl, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", *listen, err)
	}
	al, err := net.Listen("tcp", *admin)
	if err != nil {
		gl.Close()
		return fmt.Errorf("admin listen %s: %w", *admin, err)
	}
	return srv.Run(ctx, gl, al)
}

const rolloutUsage = `Usage: patchbay rollout <command> [arguments] [flags]

Rollout tools.

Commands:
  validate PATH...        check rollout files (or directories of them) as the control plane would;
                          --live: also check contracted versions against their running hosts
  rollback MODEL [flags]  send all of MODEL's traffic to its last known-good split (or --version V)
  status [MODEL] [flags]  what the control plane serves for MODEL (or every model): split, state, rollback

rollback and status talk to the control plane's admin API (--admin URL), or to the
Kubernetes API (--kubeconfig FILE and/or --namespace NS) when its rollouts are Rollout resources.

Run 'patchbay rollout <command> -h' for a command's arguments and flags.
`

func runRollout(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, rolloutUsage)
		return fmt.Errorf("rollout: no subcommand: %w", errUsage)
	}
	switch args[0] {
	case "validate":
		return validateRollouts(ctx, args[1:], stdout, stderr)
	case "rollback":
		return rollback(ctx, args[1:], stdout, stderr)
	case "status":
		return rolloutStatus(ctx, args[1:], stdout, stderr)
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, rolloutUsage)
		return flag.ErrHelp
	default:
		fmt.Fprint(stderr, rolloutUsage)
		return fmt.Errorf("rollout: unknown subcommand %q: %w", args[0], errUsage)
	}
}

func validateRollouts(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("rollout validate", "[flags] PATH...", "Checks rollout files, and directories of them, with the control plane's loader, and\nreports every problem with its file:line. Exit status 1 when any file is invalid.\n\nWith --live, it then reads, for every rollout with a contract, each version's OIP model\nmetadata from its endpoints as the control plane does (REST GET /v2/models/<m>/versions/<v>,\nor gRPC ModelMetadata for a version without REST endpoints) and reports each version that\nbreaks the contract or cannot be read as file:line: model/version: reason. Exit status 1\nwhen any does: a CI pipeline can refuse a rollout before it is applied.")
	live := fs.Bool("live", false, "also check every contracted version against the metadata its running hosts answer")
	timeout := fs.Duration("timeout", 5*time.Second, "--live: how long one endpoint's metadata read may take")
	ca := fs.String("ca", "", "--live: PEM CA bundle of the model hosts' certificates; versions with tls: true (every version with --tls) are read over TLS")
	cert := fs.String("cert", "", "--live: PEM client certificate to present to model hosts that require one")
	key := fs.String("key", "", "--live: PEM key of --cert")
	allTLS := fs.Bool("tls", false, "--live: read every version over TLS (as the control plane's --upstream-tls)")
	if err := parseFlags(fs, args, stdout, stderr); err != nil {
		return err
	}
	if !*live && (*ca != "" || *cert != "" || *key != "" || *allTLS) {
		return fmt.Errorf("rollout validate: --ca, --cert, --key and --tls are for --live: %w", errUsage)
	}
	if (*cert == "") != (*key == "") {
		return fmt.Errorf("rollout validate: --cert and --key go together: %w", errUsage)
	}
	paths := fs.Args()
	if len(paths) == 0 {
		fs.Usage()
		return fmt.Errorf("rollout validate: name at least one file or directory: %w", errUsage)
	}
	set, err := rollout.LoadFiles(paths...)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return errors.New("rollout validate: invalid")
	}
	for _, r := range set.Rollouts {
		fmt.Fprintf(stdout, "ok  %s  model %s: %s, %s\n", r.Source.File, r.Model, plural(len(r.Versions), "version"), plural(len(r.Experiments), "experiment"))
	}
	if !*live {
		return nil
	}
	var src *tlsfiles.Source
	if *ca != "" {
		if src, err = tlsfiles.Load(tlsfiles.Files{CA: *ca, Cert: *cert, Key: *key}, tlsfiles.Options{}); err != nil {
			return fmt.Errorf("rollout validate: %w", err)
		}
	}
	return validateLive(ctx, set, src, *allTLS, *timeout, stdout, stderr)
}

// validateLive checks every contracted version against its hosts' metadata with the
// control plane's own reader (xds.CheckVersionContract), endpoints as written.
func validateLive(ctx context.Context, set *rollout.Set, src *tlsfiles.Source, allTLS bool, timeout time.Duration, stdout, stderr io.Writer) error {
	bad, checked := 0, 0
	for _, r := range set.Rollouts {
		if r.Contract == nil {
			continue
		}
		for i, v := range r.Versions {
			var tlsCfg func(string) (*tls.Config, error)
			if v.TLS || allTLS {
				tlsCfg = func(host string) (*tls.Config, error) {
					if src == nil {
						return nil, errors.New("read over TLS (tls: true or --tls) and no --ca given")
					}
					return src.ClientConfig(host), nil
				}
			}
			checked++
			why := xds.CheckVersionContract(ctx, r.Contract, r.Model, v.Name, xds.MetadataEndpoints(v, nil), tlsCfg, timeout)
			if why == "" {
				fmt.Fprintf(stdout, "ok  %s:%d: %s/%s keeps the contract\n", r.Source.File, r.Line("versions["+strconv.Itoa(i)+"]"), r.Model, v.Name)
				continue
			}
			bad++
			fmt.Fprintf(stderr, "%s:%d: %s/%s: %s\n", r.Source.File, r.Line("versions["+strconv.Itoa(i)+"]"), r.Model, v.Name, why)
		}
	}
	if bad > 0 {
		return fmt.Errorf("rollout validate --live: %s of %d break their contract or cannot be read", plural(bad, "version"), checked)
	}
	if checked == 0 {
		fmt.Fprintln(stdout, "no rollout has a contract: nothing to check live")
	}
	return nil
}

func rollback(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("rollout rollback", "MODEL [flags]", "Asks the control plane to send all of MODEL's traffic to its last known-good split, or to\n--version V; --release ends a rollback in force. MODEL may come before or after the flags.\n\nThrough the admin API (--admin), or, with --kubeconfig and/or --namespace, through the\nKubernetes API: the Rollout gets the annotation "+RollbackRequestAnnotation+"\n({\"version\":...,\"release\":...,\"at\":RFC 3339,\"by\":user}), which a control plane running\nwith --source kubernetes executes and acknowledges in status.lastRollbackRequest; the\ncommand waits up to --wait for that and prints the Rollout's status.")
	admin := fs.String("admin", "http://127.0.0.1:18001", "control plane admin URL")
	kubeconfig := fs.String("kubeconfig", "", "Kubernetes: kubeconfig file (default: $KUBECONFIG, else ~/.kube/config, else in-cluster)")
	namespace := fs.String("namespace", "", "Kubernetes: namespace of the Rollout (default: the kubeconfig context's, else \"default\")")
	wait := fs.Duration("wait", 30*time.Second, "Kubernetes: how long to wait for the control plane to execute the request (0: do not wait)")
	tokenFile := fs.String("token-file", "", "file holding the admin bearer token (or set PATCHBAY_ADMIN_TOKEN)")
	version := fs.String("version", "", "send 100% to this version (default: the last known-good split)")
	release := fs.Bool("release", false, "release a rollback in force instead")
	xdsCA := fs.String("xds-ca", "", "PEM CA of the control plane's admin certificate (https admin URL)")
	xdsCert := fs.String("xds-cert", "", "PEM client certificate to present (role operator needs no token)")
	xdsKey := fs.String("xds-key", "", "PEM key of --xds-cert")
	// Accept the model before or after the flags.
	var model string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		model, args = args[0], args[1:]
	}
	if err := parseFlags(fs, args, stdout, stderr); err != nil {
		return err
	}
	if model == "" && fs.NArg() == 1 {
		model = fs.Arg(0)
	}
	if model == "" {
		return fmt.Errorf("rollout rollback: name the model: %w", errUsage)
	}
	if !rollout.ValidModelName(model) {
		return fmt.Errorf("rollout rollback: %q is not a model name: %w", model, errUsage)
	}
	if kube, err := kubeMode(fs); err != nil {
		return fmt.Errorf("rollout rollback: %w", err)
	} else if kube {
		if *version != "" && *release {
			return fmt.Errorf("rollout rollback: --version and --release exclude each other: %w", errUsage)
		}
		k, err := connectKube(*kubeconfig, *namespace)
		if err != nil {
			return fmt.Errorf("rollout rollback: %w", err)
		}
		return kubeRollback(ctx, k, model, *version, *release, *wait, stdout)
	}
	token, tokenFrom := os.Getenv("PATCHBAY_ADMIN_TOKEN"), "PATCHBAY_ADMIN_TOKEN"
	if *tokenFile != "" {
		tokenFrom = "--token-file " + *tokenFile
		b, err := os.ReadFile(*tokenFile)
		if err != nil {
			return fmt.Errorf("token: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	method, body := http.MethodPost, []byte("{}")
	if *version != "" {
		body, _ = json.Marshal(map[string]string{"version": *version})
	}
	if *release {
		method, body = http.MethodDelete, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(*admin, "/")+"/v1/models/"+url.PathEscape(model)+"/rollback", bytes.NewReader(body))
	if err != nil {
		return err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	req.Header.Set("Content-Type", "application/json")
	client, err := adminClient(tlsfiles.Files{Cert: *xdsCert, Key: *xdsKey, CA: *xdsCA}, req.URL.Hostname())
	if err != nil {
		return fmt.Errorf("rollback: %w", err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("rollback: %w", err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		msg := strings.TrimSpace(string(out))
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(out, &e) == nil && e.Error != "" {
			msg = e.Error
		}
		if resp.StatusCode == http.StatusUnauthorized {
			if token == "" {
				msg += "\nno token was sent: pass --token-file FILE (the file of the control plane's --admin-token-file) or set PATCHBAY_ADMIN_TOKEN"
			} else {
				msg += "\nthe token from " + tokenFrom + " was refused: it must be the content of the control plane's --admin-token-file"
			}
		}
		return fmt.Errorf("rollback: %s: %s", resp.Status, msg)
	}
	_, err = stdout.Write(out)
	return err
}

// kubernetesSource points cfg at the Kubernetes API: Rollouts of the namespace as the
// Source, their status as the Store, and Service names resolved from EndpointSlices
// (every other name through DNS, as before); onSliceChange is called on every change of
// an EndpointSlice (the server re-resolves at once rather than at the next refresh).
func kubernetesSource(ctx context.Context, cfg *xds.Config, kubeconfig, namespace string, refresh time.Duration, onSliceChange func()) (*kube.Source, error) {
	if kubeconfig == "" {
		// $KUBECONFIG may list several files: like kubectl, the first one that exists.
		for _, f := range filepath.SplitList(os.Getenv("KUBECONFIG")) {
			if _, err := os.Stat(f); err == nil {
				kubeconfig = f
				break
			}
		}
	}
	if namespace == "" {
		namespace = defaultNamespace()
	}
	clients, err := kube.NewClients(kubeconfig)
	if err != nil {
		return nil, err
	}
	kc := kube.Config{Client: clients.Dynamic, Namespace: namespace, Logger: cfg.Logger.With().Str("component", "kube").Logger()}
	src := kube.NewSource(kc)
	cfg.Source, cfg.Store = src, requestStore{kube.NewStore(kc)}
	res := endpointslice.New(clients.Kube, endpointslice.Options{Namespace: namespace, Next: net.DefaultResolver.LookupHost,
		OnChange: onSliceChange})
	res.Start(ctx)
	cfg.LookupHost = res.LookupHost
	cfg.Zones = res.Zones
	cfg.Logger.Info().Str("namespace", namespace).Str("kubeconfig", kubeconfig).Dur("endpoint_refresh", refresh).
		Msg("kubernetes source: Rollouts and their status; Service names from EndpointSlices (re-resolved on every change)")
	return src, nil
}

// kubeMode reports whether a rollout command talks to the Kubernetes API (--kubeconfig or
// --namespace given) rather than the admin API; giving flags of both is a usage error.
func kubeMode(fs *flag.FlagSet) (bool, error) {
	var kube, admin []string
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "kubeconfig", "namespace", "wait":
			kube = append(kube, "--"+f.Name)
		case "admin", "token-file", "xds-ca", "xds-cert", "xds-key":
			admin = append(admin, "--"+f.Name)
		}
	})
	if len(kube) > 0 && len(admin) > 0 {
		return false, fmt.Errorf("%s (Kubernetes API) and %s (admin API) exclude each other: %w",
			strings.Join(kube, ", "), strings.Join(admin, ", "), errUsage)
	}
	kubeSet := slices.ContainsFunc(kube, func(f string) bool { return f != "--wait" })
	if len(kube) > 0 && !kubeSet {
		return false, fmt.Errorf("--wait needs --kubeconfig or --namespace: %w", errUsage)
	}
	return kubeSet, nil
}

// rolloutStatus prints what the control plane serves, from its admin API's /status or
// from the Rollouts' status in the Kubernetes API.
func rolloutStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("rollout status", "[MODEL] [flags]", "Shows what the control plane serves for MODEL, or for every model: the split in force,\nthe state (Serving, RolledBack, Invalid), the rollback in force and the problems found.\nFrom the admin API's /status (--admin), or, with --kubeconfig and/or --namespace, from\nthe Rollouts' status in the Kubernetes API (split, state, conditions, rollback, and a\npending "+RollbackRequestAnnotation+"). MODEL may come before or after the flags.")
	admin := fs.String("admin", "http://127.0.0.1:18001", "control plane admin URL")
	xdsCA := fs.String("xds-ca", "", "PEM CA of the control plane's admin certificate (https admin URL)")
	xdsCert := fs.String("xds-cert", "", "PEM client certificate to present")
	xdsKey := fs.String("xds-key", "", "PEM key of --xds-cert")
	kubeconfig := fs.String("kubeconfig", "", "Kubernetes: kubeconfig file (default: $KUBECONFIG, else ~/.kube/config, else in-cluster)")
	namespace := fs.String("namespace", "", "Kubernetes: namespace of the Rollouts (default: the kubeconfig context's, else \"default\")")
	var model string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		model, args = args[0], args[1:]
	}
	if err := parseFlags(fs, args, stdout, stderr); err != nil {
		return err
	}
	if model == "" && fs.NArg() == 1 {
		model = fs.Arg(0)
	} else if fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("rollout status: unexpected arguments %q: %w", fs.Args(), errUsage)
	}
	if model != "" && !rollout.ValidModelName(model) {
		return fmt.Errorf("rollout status: %q is not a model name: %w", model, errUsage)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	kube, err := kubeMode(fs)
	if err != nil {
		return fmt.Errorf("rollout status: %w", err)
	}
	if kube {
		k, err := connectKube(*kubeconfig, *namespace)
		if err != nil {
			return fmt.Errorf("rollout status: %w", err)
		}
		ros, err := k.rollouts(ctx, model)
		if err != nil {
			return fmt.Errorf("rollout status: %w", err)
		}
		for i := range ros {
			writeRolloutStatus(stdout, &ros[i])
		}
		if len(ros) == 0 {
			fmt.Fprintf(stdout, "no Rollouts in namespace %s\n", k.namespace)
		}
		return nil
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(*admin, "/")+"/status", nil)
	if err != nil {
		return err
	}
	client, err := adminClient(tlsfiles.Files{Cert: *xdsCert, Key: *xdsKey, CA: *xdsCA}, req.URL.Hostname())
	if err != nil {
		return fmt.Errorf("rollout status: %w", err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("rollout status: %w", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("rollout status: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	var st xds.Status
	if err := json.Unmarshal(body, &st); err != nil {
		return fmt.Errorf("rollout status: %s/status: %w", *admin, err)
	}
	found := false
	for _, m := range st.Models {
		if model != "" && m.Name != model {
			continue
		}
		found = true
		traffic := map[string]any{}
		for v, p := range m.Traffic {
			traffic[v] = p
		}
		state := "Serving"
		if m.Rollback != nil {
			state = "RolledBack"
		}
		fmt.Fprintf(stdout, "model %s (%s, config version %s)\n", m.Name, m.File, st.ConfigVersion)
		fmt.Fprintf(stdout, "  split:     %s\n", splitString(traffic))
		fmt.Fprintf(stdout, "  state:     %s\n", state)
		if m.Rollback != nil {
			fmt.Fprintf(stdout, "  rollback:  %s (at %s)\n", m.Rollback.Reason, m.Rollback.At.Format(time.RFC3339))
		} else {
			fmt.Fprintf(stdout, "  rollback:  none\n")
		}
		if a := m.Analysis; a != nil {
			fmt.Fprintf(stdout, "  analysis:  %s, canary %s vs baseline %s, step %d of %d (%d%%)\n", a.Phase, a.Canary, a.Baseline, a.Step, len(a.Steps), a.Share)
			if a.Reason != "" {
				fmt.Fprintf(stdout, "    reason:   %s\n", a.Reason)
			}
			if a.Decision != "" {
				fmt.Fprintf(stdout, "    decision: %s %s (at %s)\n", a.Decision, a.DecisionWhy, a.EvaluatedAt.Format(time.RFC3339))
			}
			for _, g := range a.Gates {
				verdict := "pass"
				switch {
				case g.NoData != "":
					verdict = "no data: " + g.NoData
				case !g.Pass:
					verdict = "FAIL"
				}
				fmt.Fprintf(stdout, "    gate %-22s %-10.4g threshold %-8.4g %s\n", g.Gate, g.Value, g.Threshold, verdict)
			}
		}
	}
	if st.CurrentError != nil {
		b, _ := json.Marshal(st.CurrentError)
		fmt.Fprintf(stdout, "last reload refused (the last good config is served): %s\n", b)
	}
	if model != "" && !found {
		return fmt.Errorf("rollout status: the control plane at %s serves no model %q", *admin, model)
	}
	return nil
}

// stringsFlag is a repeatable string flag.
type stringsFlag []string

func (f *stringsFlag) String() string     { return strings.Join(*f, ",") }
func (f *stringsFlag) Set(v string) error { *f = append(*f, v); return nil }

// adminClient is the HTTP client for the control plane's admin API: the default one, or
// one presenting --xds-cert and checking the server against --xds-ca for serverName.
func adminClient(f tlsfiles.Files, serverName string) (*http.Client, error) {
	if !f.Enabled() {
		return http.DefaultClient, nil
	}
	src, err := tlsfiles.Load(f, tlsfiles.Options{})
	if err != nil {
		return nil, err
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: src.ClientConfig(serverName)}}, nil
}
