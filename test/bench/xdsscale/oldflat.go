package xdsscale

import (
	"fmt"
	"slices"
	"strings"

	"github.com/patchbay-io/patchbay/xds/rollout"
)

// OldFlatMatchers is the reference of the route shape before Scoped RDS (the one edge
// RouteConfiguration "patchbay" of commits up to 403a3fa): how many route matchers a
// REST `POST /v2/models/<model>/infer` without x-patchbay-version passed through. That
// table held, in order: 2 repository refusals; then per model, by name, a pin refusal
// (pinning off), for each of infer, metadata, ready and server one route per version
// (matched on x-patchbay-version) and a split, then rest-other and grpc-refused (27
// routes for 5 versions); then 4 catch-alls. The request for a model walks every earlier
// model's routes, its pin refusal, its infer version routes and lands on its split.
// A test (removed with the flat table) checked this against that table's walk at 403a3fa;
// rollouts it does not model (pinning, experiments) return an error rather than a guess.
func OldFlatMatchers(set *rollout.Set, model string) (int, error) {
	rs := slices.Clone(set.Rollouts)
	slices.SortFunc(rs, func(a, b *rollout.Rollout) int { return strings.Compare(a.Model, b.Model) })
	n := 2
	for _, r := range rs {
		if r.Pinning || len(r.Experiments) > 0 {
			return 0, fmt.Errorf("model %s: pinning/experiments are not modelled by the reference", r.Model)
		}
		v := len(r.Versions)
		if r.Model == model {
			return n + 1 + v + 1, nil
		}
		n += 3 + 4*(v+1)
	}
	return 0, fmt.Errorf("no model %s", model)
}
