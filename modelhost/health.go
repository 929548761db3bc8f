package modelhost

import (
	"sync"

	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/patchbay-io/patchbay/api/oip"
)

// versionHealth publishes one grpc.health.v1 service per model version
// (oip.HealthService(model, version)) on every health server the host serves: SERVING
// while the version is loaded and ready, NOT_SERVING once it failed to load or was
// unloaded. The control plane's gRPC clusters health-check these names, so a version
// leaves Envoy's load balancing although the host process stays up. Statuses are
// republished after every table swap (load, unload, close), under the same lock that
// serialises the swaps, so a Watch sees them in the order they happened.
type versionHealth struct {
	mu      sync.Mutex
	servers []*grpchealth.Server
	known   map[string]bool // every service name ever published, so a removed version reads NOT_SERVING rather than unknown
}

// addHealthServer publishes the current per-version statuses on h and keeps them current.
func (s *Server) addHealthServer(h *grpchealth.Server) {
	s.health.mu.Lock()
	s.health.servers = append(s.health.servers, h)
	s.health.mu.Unlock()
	s.publishHealth()
}

// publishHealth sets every known per-version service from the current table.
func (s *Server) publishHealth() {
	// The table is read under the lock: two publishers (a start and a load) then publish in
	// turn, each from the newest table, and a stale one never writes last.
	s.health.mu.Lock()
	defer s.health.mu.Unlock()
	t := s.table.Load()
	if s.health.known == nil {
		s.health.known = map[string]bool{}
	}
	want := make(map[string]healthpb.HealthCheckResponse_ServingStatus, len(s.health.known))
	for name := range s.health.known {
		want[name] = healthpb.HealthCheckResponse_NOT_SERVING
	}
	for _, m := range t.models {
		for vn, v := range m.versions {
			st := healthpb.HealthCheckResponse_NOT_SERVING
			if v.ready() {
				st = healthpb.HealthCheckResponse_SERVING
			}
			name := oip.HealthService(m.name, vn)
			want[name] = st
			s.health.known[name] = true
		}
	}
	for _, h := range s.health.servers {
		for name, st := range want {
			h.SetServingStatus(name, st) // ignored once h is shut down
		}
	}
}
