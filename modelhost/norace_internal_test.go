//go:build !race

package modelhost

const raceInternal = false
