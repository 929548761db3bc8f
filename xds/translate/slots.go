package translate

// Slots is the number of slots of a model's baseline split: one per percent. Envoy takes
// x-patchbay-bucket % Slots and walks the weighted clusters in order.
const Slots = 100

// SlotMap assigns each of the Slots slots to a version name. It is the state that makes
// ramps monotone: NextSlotMap changes only the slots that must move.
type SlotMap []string

// NextSlotMap returns the slot map for the weights (version -> percent, summing to Slots),
// changing as few slots of prev as possible: a version that shrank releases its
// highest-numbered slots, a version that grew takes the lowest-numbered released ones, and
// every other slot keeps its version. So when shares move from some versions to others, the
// only users who change variant are those who move onto a version that grew. With no prev
// (or prev of the wrong length) the map is laid out in the order of versions.
func NextSlotMap(prev SlotMap, versions []string, weights map[string]int) SlotMap {
	if holds(prev, weights) {
		return prev // nothing moves: the same map (callers treat slot maps as read-only)
	}
	next := make(SlotMap, Slots)
	if len(prev) != Slots {
		i := 0
		for _, v := range versions {
			for n := 0; n < weights[v] && i < Slots; n++ {
				next[i] = v
				i++
			}
		}
		return next
	}
	copy(next, prev)
	have := map[string]int{}
	for _, v := range next {
		have[v]++
	}
	// Release: walk from the top so a shrinking version keeps its lowest slots.
	for i := Slots - 1; i >= 0; i-- {
		v := next[i]
		if have[v] > weights[v] {
			have[v]--
			next[i] = ""
		}
	}
	// Take: growing versions in rollout order fill free slots from the bottom.
	free := 0
	for _, v := range versions {
		for have[v] < weights[v] {
			for free < Slots && next[free] != "" {
				free++
			}
			if free == Slots {
				break
			}
			next[free] = v
			have[v]++
		}
	}
	return next
}

// Run is a maximal stretch of consecutive slots held by one version.
type Run struct {
	Version string `json:"version"`
	Weight  uint32 `json:"weight"` // slots, out of Slots
}

// Runs compresses a slot map into the ordered weighted-cluster entries Envoy walks.
// A version may appear in several runs.
func (m SlotMap) Runs() []Run {
	var runs []Run
	for _, v := range m {
		if n := len(runs); n > 0 && runs[n-1].Version == v {
			runs[n-1].Weight++
			continue
		}
		runs = append(runs, Run{Version: v, Weight: 1})
	}
	return runs
}

// VersionAt returns the version that serves a bucket value, as Envoy picks it.
func (m SlotMap) VersionAt(bucket uint64) string { return m[bucket%Slots] }

// holds reports whether m already gives every version its weight, without allocating:
// one pass over the slots counting runs of versions (a model has a handful).
func holds(m SlotMap, weights map[string]int) bool {
	if len(m) != Slots {
		return false
	}
	var names [8]string
	var counts [8]int
	n := 0
	for _, v := range m {
		i := 0
		for i < n && names[i] != v {
			i++
		}
		if i == n {
			if n == len(names) {
				return false // more versions than this fast path counts: take the slow one
			}
			names[n] = v
			n++
		}
		counts[i]++
	}
	positive := 0
	for _, w := range weights {
		if w > 0 {
			positive++
		}
	}
	if positive != n {
		return false
	}
	for i := range n {
		if weights[names[i]] != counts[i] {
			return false
		}
	}
	return true
}
