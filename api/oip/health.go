package oip

// HealthService is the gRPC health service name (grpc.health.v1) under which a model host
// reports one model version: SERVING while that version is loaded and ready, NOT_SERVING
// otherwise. Envoy's gRPC health check of the version's gRPC cluster names it, so a
// version that is unloaded or failing leaves the split although its server stays up.
func HealthService(model, version string) string { return "patchbay.model/" + model + "/" + version }
