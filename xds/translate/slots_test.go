package translate

import (
	"math/rand/v2"
	"testing"

	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
)

// TestRampsAreMonotone drives many random successive weight changes over 2 to 5 versions
// and checks, for 20,000 users, the design's rule: a user who changes variant moves onto
// a version whose share grew. It also checks the split itself is exact.
func TestRampsAreMonotone(t *testing.T) {
	t.Parallel()
	users := make([]uint64, 20000)
	for i := range users {
		users[i] = policyv1.Hash("ranker", string(rune('a'+i%26))+string(rune(i)))
	}
	rng := rand.New(rand.NewPCG(7, 11))
	for n := 2; n <= 5; n++ {
		versions := []string{"v1", "v2", "v3", "v4", "v5"}[:n]
		weights := map[string]int{versions[0]: 100}
		m := NextSlotMap(nil, versions, weights)
		for step := 0; step < 200; step++ {
			next := map[string]int{}
			for k, v := range weights {
				next[k] = v
			}
			// Move a random amount from some versions to others (one or two donors).
			to := versions[rng.IntN(n)]
			for d := 0; d < 1+rng.IntN(2); d++ {
				from := versions[rng.IntN(n)]
				if from == to || next[from] == 0 {
					continue
				}
				amt := 1 + rng.IntN(next[from])
				next[from] -= amt
				next[to] += amt
			}
			nm := NextSlotMap(m, versions, next)
			count := map[string]int{}
			for _, v := range nm {
				count[v]++
			}
			for _, v := range versions {
				if count[v] != next[v] {
					t.Fatalf("n=%d step %d: %s holds %d slots, want %d", n, step, v, count[v], next[v])
				}
			}
			for _, u := range users {
				before, after := m.VersionAt(u), nm.VersionAt(u)
				if before != after && next[after] <= weights[after] {
					t.Fatalf("n=%d step %d: user moved %s -> %s, but %s did not grow (%d -> %d)",
						n, step, before, after, after, weights[after], next[after])
				}
				if before != after && next[before] >= weights[before] {
					t.Fatalf("n=%d step %d: user left %s, which did not shrink", n, step, before)
				}
			}
			m, weights = nm, next
		}
	}
}

func TestRunsAndInitialLayout(t *testing.T) {
	t.Parallel()
	m := NextSlotMap(nil, []string{"a", "b"}, map[string]int{"a": 90, "b": 10})
	runs := m.Runs()
	if len(runs) != 2 || runs[0] != (Run{"a", 90}) || runs[1] != (Run{"b", 10}) {
		t.Fatalf("runs = %v", runs)
	}
	// a -> 80, c new 10: a releases its top slots 80..89, c takes them: a, c, b.
	m = NextSlotMap(m, []string{"a", "b", "c"}, map[string]int{"a": 80, "b": 10, "c": 10})
	runs = m.Runs()
	want := []Run{{"a", 80}, {"c", 10}, {"b", 10}}
	if len(runs) != 3 || runs[0] != want[0] || runs[1] != want[1] || runs[2] != want[2] {
		t.Fatalf("runs = %v, want %v", runs, want)
	}
}
