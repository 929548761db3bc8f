package runtimetune

import (
	"runtime/debug"
	"testing"
	"testing/fstest"
)

func TestResolve(t *testing.T) {
	t.Parallel()
	def := Defaults{GCPercent: 400, LimitFraction: 0.9}
	const gib = 1 << 30
	g := float64(gib)
	lim90 := int64(g * 0.9)
	for _, tc := range []struct {
		name           string
		in             Input
		gc             int
		gcFrom         string
		limit          int64
		limitFrom      string
		setGC, setLimt bool
	}{
		{"nothing given, no container limit: the defaults, no memory limit",
			Input{}, 400, "default", NoLimit, "default", true, true},
		{"nothing given, container limit: a fraction of it",
			Input{CgroupLimit: 1 * gib}, 400, "default", lim90, "default", true, true},
		{"explicit auto is the default",
			Input{MemoryLimitFlag: "auto", CgroupLimit: 1 * gib, EnvGOMEMLIMIT: "100MiB"}, 400, "default", lim90, "default", true, true},
		{"env wins over the defaults and is left to the runtime",
			Input{EnvGOGC: "150", EnvGOMEMLIMIT: "300MiB", CgroupLimit: gib}, 150, "env", 300 << 20, "env", false, false},
		{"env GOGC=off",
			Input{EnvGOGC: "off"}, -1, "env", NoLimit, "default", false, true},
		{"flags win over env",
			Input{GCPercentFlag: "200", MemoryLimitFlag: "2GiB", EnvGOGC: "150", EnvGOMEMLIMIT: "300MiB", CgroupLimit: gib}, 200, "flag", 2 * gib, "flag", true, true},
		{"flag none removes a container-derived limit",
			Input{MemoryLimitFlag: "none", CgroupLimit: gib}, 400, "default", NoLimit, "flag", true, true},
		{"gc off with a container limit",
			Input{GCPercentFlag: "off", CgroupLimit: gib}, -1, "flag", lim90, "default", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.in.Defaults = def
			s, err := Resolve(tc.in)
			if err != nil {
				t.Fatal(err)
			}
			if s.GCPercent != tc.gc || s.GCFrom != tc.gcFrom || s.MemoryLimit != tc.limit || s.LimitFrom != tc.limitFrom ||
				s.setGC != tc.setGC || s.setLimit != tc.setLimt {
				t.Errorf("Resolve(%+v) = %+v", tc.in, s)
			}
		})
	}
}

func TestResolveErrors(t *testing.T) {
	t.Parallel()
	def := Defaults{GCPercent: 400, LimitFraction: 0.9}
	for _, in := range []Input{
		{GCPercentFlag: "0"},
		{GCPercentFlag: "-5"},
		{GCPercentFlag: "lots"},
		{MemoryLimitFlag: "12XB"},
		{MemoryLimitFlag: "-1MiB"},
		{MemoryLimitFlag: "99999999999TiB"},
		{GCPercentFlag: "off"}, // off without any limit: unbounded heap
	} {
		in.Defaults = def
		if s, err := Resolve(in); err == nil {
			t.Errorf("Resolve(%+v) = %+v, want an error", in, s)
		}
	}
	if _, err := Resolve(Input{}); err == nil {
		t.Error("a zero default GC percent was accepted")
	}
}

func TestParseLimit(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]int64{"1048576": 1 << 20, "512MiB": 512 << 20, "2GiB": 2 << 30, "64KiB": 64 << 10,
		"1TiB": 1 << 40, "100B": 100, "none": NoLimit, "0": NoLimit, " 3GiB ": 3 << 30} {
		if got, err := ParseLimit(in); err != nil || got != want {
			t.Errorf("ParseLimit(%q) = %d, %v; want %d", in, got, err, want)
		}
		if want != NoLimit {
			if got, _ := ParseLimit(FormatSize(want)); got != want {
				t.Errorf("FormatSize(%d) = %q does not read back", want, FormatSize(want))
			}
		}
	}
}

func FuzzParseLimit(f *testing.F) {
	for _, s := range []string{"512MiB", "1", "none", "9223372036854775807B", "8589934592GiB", "-1", "1.5GiB"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseLimit(s)
		if err != nil {
			return
		}
		if n <= 0 {
			t.Fatalf("ParseLimit(%q) = %d", s, n)
		}
		if n != NoLimit {
			if m, err := ParseLimit(FormatSize(n)); err != nil || m != n {
				t.Fatalf("FormatSize(%d) = %q reads back as %d, %v", n, FormatSize(n), m, err)
			}
		}
	})
}

func TestCgroupMemoryLimit(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		fs   fstest.MapFS
		want int64
	}{
		{"v2 limit", fstest.MapFS{"memory.max": {Data: []byte("536870912\n")}}, 512 << 20},
		{"v2 none", fstest.MapFS{"memory.max": {Data: []byte("max\n")}}, 0},
		{"v1 limit", fstest.MapFS{"memory/memory.limit_in_bytes": {Data: []byte("1073741824\n")}}, 1 << 30},
		{"v1 none", fstest.MapFS{"memory/memory.limit_in_bytes": {Data: []byte("9223372036854771712\n")}}, 0},
		{"no cgroup", fstest.MapFS{}, 0},
		{"garbage", fstest.MapFS{"memory.max": {Data: []byte("lots")}}, 0},
	} {
		if got := CgroupMemoryLimit(tc.fs); got != tc.want {
			t.Errorf("%s: CgroupMemoryLimit = %d, want %d", tc.name, got, tc.want)
		}
	}
}

// TestApply sets the runtime's values and reads them back (not parallel: process-wide).
func TestApply(t *testing.T) {
	oldGC, oldLimit := debug.SetGCPercent(100), debug.SetMemoryLimit(NoLimit)
	t.Cleanup(func() { debug.SetGCPercent(oldGC); debug.SetMemoryLimit(oldLimit) })
	s, err := Resolve(Input{CgroupLimit: 1 << 30, Defaults: Defaults{GCPercent: 300, LimitFraction: 0.5}})
	if err != nil {
		t.Fatal(err)
	}
	s.Apply()
	if gc, lim := debug.SetGCPercent(100), debug.SetMemoryLimit(-1); gc != 300 || lim != 512<<20 {
		t.Errorf("after Apply: GC percent %d, memory limit %d; want 300, %d", gc, lim, 512<<20)
	}
	// Values from the environment are the runtime's already: Apply leaves them.
	debug.SetGCPercent(123)
	s, _ = Resolve(Input{EnvGOGC: "123", EnvGOMEMLIMIT: "1GiB", Defaults: Defaults{GCPercent: 300}})
	debug.SetMemoryLimit(1 << 30)
	s.Apply()
	if gc, lim := debug.SetGCPercent(100), debug.SetMemoryLimit(-1); gc != 123 || lim != 1<<30 {
		t.Errorf("env settings changed by Apply: GC percent %d, memory limit %d", gc, lim)
	}
}
