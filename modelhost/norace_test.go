//go:build !race

package modelhost_test

const raceEnabled = false
