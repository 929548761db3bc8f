//go:build race

package modelhost

// raceInternal: the race detector adds allocations (see race_test.go).
const raceInternal = true
