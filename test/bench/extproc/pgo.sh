#!/bin/sh
# Regenerates cmd/patchbay/default.pgo, the CPU profile `go build ./cmd/patchbay` optimises
# the binary with (profile-guided optimisation; Go reads default.pgo in the main package's
# directory by itself). The profile is of `patchbay extproc` as shipped, under the load of
# BenchmarkExtprocSweep (16 workers, one ext_proc stream per request, realistic Envoy
# headers; the floor's turns leave it idle in between), written by the binary itself
# ($PATCHBAY_EXTPROC_CPUPROFILE). Run from anywhere: test/bench/extproc/pgo.sh [ROUNDS]
# (default 30 rounds, ~25 s of load on the binary, ~1 min in all). Quiet machine preferred.
set -eu
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
rounds=${1:-30}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The binary as `go build` makes it today (with the current default.pgo, if any: profiling
# an optimised binary is fine, see https://go.dev/doc/pgo, "Iterative lifecycle").
go build -o "$tmp/patchbay" ./cmd/patchbay
PATCHBAY_BENCH_SWEEP_ROUNDS=$rounds \
PATCHBAY_BENCH_SWEEP="shipped: bin:$tmp/patchbay PATCHBAY_EXTPROC_CPUPROFILE=$tmp/extproc.pprof" \
	go test ./test/bench/extproc -run '^$' -bench ExtprocSweep -benchtime 1x -count 1 >"$tmp/bench.txt" 2>&1 ||
	{ cat "$tmp/bench.txt"; exit 1; }
grep -E '^(shipped|variant|[0-9]+ rounds)' "$tmp/bench.txt" || true
test -s "$tmp/extproc.pprof"
cp "$tmp/extproc.pprof" cmd/patchbay/default.pgo
go tool pprof -top -nodecount=1 "$tmp/patchbay" cmd/patchbay/default.pgo 2>/dev/null | grep -E '^(Duration|Showing)' || true
echo "wrote cmd/patchbay/default.pgo ($(wc -c <cmd/patchbay/default.pgo) bytes)"
