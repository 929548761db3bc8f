package main

import (
	"flag"
	"io"
	"runtime"
	"strconv"
	"testing"

	"github.com/patchbay-io/patchbay/internal/runtimetune"
)

// TestRuntimeSettingsPrecedence: with no flag and no environment the binaries' measured
// defaults apply (the memory limit from the container's); $GOGC / $GOMEMLIMIT win over
// them; a flag the user gives wins over both.
func TestRuntimeSettingsPrecedence(t *testing.T) {
	t.Parallel()
	const gib = 1 << 30
	for _, tc := range []struct {
		name       string
		args       []string
		env        map[string]string
		cgroup     int64
		wantGC     int
		wantLimit  int64
		gcFrom     string
		limitFrom  string
		wantErrArg bool
	}{
		{name: "defaults, no container limit", wantGC: extprocDefaults.GCPercent, wantLimit: runtimetune.NoLimit, gcFrom: "default", limitFrom: "default"},
		{name: "defaults, container limit", cgroup: gib, wantGC: extprocDefaults.GCPercent, wantLimit: int64(float64(gib) * extprocDefaults.LimitFraction), gcFrom: "default", limitFrom: "default"},
		{name: "env wins over defaults", env: map[string]string{"GOGC": "100", "GOMEMLIMIT": "256MiB"}, cgroup: gib,
			wantGC: 100, wantLimit: 256 << 20, gcFrom: "env", limitFrom: "env"},
		{name: "flags win over env", args: []string{"--gc-percent", "200", "--memory-limit", "1GiB"}, env: map[string]string{"GOGC": "100", "GOMEMLIMIT": "256MiB"},
			wantGC: 200, wantLimit: gib, gcFrom: "flag", limitFrom: "flag"},
		{name: "gc off with a memory limit", args: []string{"--gc-percent", "off", "--memory-limit", "300MiB"},
			wantGC: -1, wantLimit: 300 << 20, gcFrom: "flag", limitFrom: "flag"},
		{name: "gc off without any limit is refused", args: []string{"--gc-percent", "off"}, wantErrArg: true},
		{name: "bad size", args: []string{"--memory-limit", "lots"}, wantErrArg: true},
		{name: "zero gc percent", args: []string{"--gc-percent", "0"}, wantErrArg: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := flag.NewFlagSet("extproc", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			gc := fs.String("gc-percent", strconv.Itoa(extprocDefaults.GCPercent), "")
			lim := fs.String("memory-limit", "auto", "")
			if err := fs.Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			s, err := resolveRuntime(fs, *gc, *lim, extprocDefaults, func(k string) string { return tc.env[k] }, tc.cgroup)
			if tc.wantErrArg {
				if err == nil {
					t.Fatalf("got %v, want an error", s)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s.GCPercent != tc.wantGC || s.MemoryLimit != tc.wantLimit || s.GCFrom != tc.gcFrom || s.LimitFrom != tc.limitFrom {
				t.Errorf("got %+v, want GC %d (%s), limit %d (%s)", s, tc.wantGC, tc.gcFrom, tc.wantLimit, tc.limitFrom)
			}
		})
	}
}

func TestStreamWorkers(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]uint32{"auto": uint32(8 * runtime.GOMAXPROCS(0)), "0": 0, "8": 8} {
		if got, err := streamWorkers(in); err != nil || got != want {
			t.Errorf("streamWorkers(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"-1", "many", "", "70000"} {
		if _, err := streamWorkers(in); err == nil {
			t.Errorf("streamWorkers(%q) accepted", in)
		}
	}
}

// TestModelhostRuntimeDefaults: patchbay modelhost keeps the runtime's GC percent and sets
// the soft memory limit from the container's; $GOMEMLIMIT still wins.
func TestModelhostRuntimeDefaults(t *testing.T) {
	t.Parallel()
	fs := flag.NewFlagSet("modelhost", flag.ContinueOnError)
	gc := fs.String("gc-percent", strconv.Itoa(modelhostDefaults.GCPercent), "")
	lim := fs.String("memory-limit", "auto", "")
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	none := func(string) string { return "" }
	s, err := resolveRuntime(fs, *gc, *lim, modelhostDefaults, none, 4<<30)
	if err != nil {
		t.Fatal(err)
	}
	if want := int64(float64(4<<30) * modelhostDefaults.LimitFraction); s.GCPercent != 100 || s.MemoryLimit != want || s.LimitFrom != "default" {
		t.Errorf("modelhost defaults in a 4 GiB container: %v", s)
	}
	s, err = resolveRuntime(fs, *gc, *lim, modelhostDefaults, func(k string) string { return map[string]string{"GOMEMLIMIT": "1GiB"}[k] }, 4<<30)
	if err != nil || s.MemoryLimit != 1<<30 || s.LimitFrom != "env" {
		t.Errorf("with $GOMEMLIMIT=1GiB: %v, %v", s, err)
	}
}
