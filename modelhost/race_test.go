//go:build race

package modelhost_test

// raceEnabled: the race detector adds allocations and makes sync.Pool drop items.
const raceEnabled = true
