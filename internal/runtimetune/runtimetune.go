// Package runtimetune decides a server's Go runtime settings — the GC percent and the
// soft memory limit — from its flags, the user's $GOGC / $GOMEMLIMIT and the
// container's memory limit, and applies them. Precedence, highest first: an explicit
// flag, the environment variable (already applied by the Go runtime at start, so left
// alone), the binary's measured default. The binaries' defaults and the measurements
// behind them are in extproc/README.md ("Runtime defaults").
package runtimetune

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
	"runtime/debug"
	"strconv"
	"strings"
)

// NoLimit is the memory limit meaning "none" (the runtime's own default).
const NoLimit = math.MaxInt64

// Input is what a binary knows at start. Flags are the raw flag values, "" when the
// user did not give the flag.
type Input struct {
	GCPercentFlag   string // "-1"/"off", or a positive integer
	MemoryLimitFlag string // "auto", "none", or a size (GOMEMLIMIT syntax: 512MiB, 1GiB, bytes)
	EnvGOGC         string // $GOGC
	EnvGOMEMLIMIT   string // $GOMEMLIMIT
	CgroupLimit     int64  // the container's memory limit in bytes; 0: none
	Defaults        Defaults
}

// Defaults are a binary's measured defaults.
type Defaults struct {
	// GCPercent is the GC percent when neither the flag nor $GOGC is given (> 0).
	GCPercent int
	// LimitFraction is the share of the container's memory limit used as the soft
	// memory limit when neither the flag nor $GOMEMLIMIT is given ("auto"); no
	// container limit: none.
	LimitFraction float64
}

// Settings are the resolved settings, with where each came from ("flag", "env",
// "default").
type Settings struct {
	GCPercent   int   // -1: off
	MemoryLimit int64 // bytes; NoLimit: none
	GCFrom      string
	LimitFrom   string
	// setGC / setLimit: Apply must set the value (false when the runtime already
	// applied the environment's).
	setGC, setLimit bool
}

// Resolve computes the settings from in. Bad flag values are errors; bad environment
// values are left to the runtime, which already rejected or applied them.
func Resolve(in Input) (Settings, error) {
	var s Settings
	switch {
	case in.GCPercentFlag != "":
		p, err := ParseGCPercent(in.GCPercentFlag)
		if err != nil {
			return Settings{}, fmt.Errorf("--gc-percent: %w", err)
		}
		s.GCPercent, s.GCFrom, s.setGC = p, "flag", true
	case in.EnvGOGC != "":
		p, err := ParseGCPercent(in.EnvGOGC)
		if err != nil {
			p = 100 // the runtime ignores a bad $GOGC
		}
		s.GCPercent, s.GCFrom = p, "env"
	default:
		if in.Defaults.GCPercent <= 0 {
			return Settings{}, errors.New("runtimetune: default GC percent must be > 0")
		}
		s.GCPercent, s.GCFrom, s.setGC = in.Defaults.GCPercent, "default", true
	}

	flag := in.MemoryLimitFlag
	if flag == "auto" {
		flag = ""
	}
	switch {
	case flag != "":
		n, err := ParseLimit(flag)
		if err != nil {
			return Settings{}, fmt.Errorf("--memory-limit: %w", err)
		}
		s.MemoryLimit, s.LimitFrom, s.setLimit = n, "flag", true
	case in.MemoryLimitFlag == "" && in.EnvGOMEMLIMIT != "":
		n, err := ParseLimit(in.EnvGOMEMLIMIT)
		if err != nil {
			n = NoLimit
		}
		s.MemoryLimit, s.LimitFrom = n, "env"
	default:
		s.MemoryLimit, s.LimitFrom, s.setLimit = NoLimit, "default", true
		if in.CgroupLimit > 0 && in.Defaults.LimitFraction > 0 {
			s.MemoryLimit = int64(float64(in.CgroupLimit) * in.Defaults.LimitFraction)
		}
	}
	if s.GCPercent < 0 && s.MemoryLimit == NoLimit && s.GCFrom == "flag" {
		return Settings{}, errors.New("--gc-percent off needs a memory limit (--memory-limit, $GOMEMLIMIT or a container limit): the heap would grow without bound")
	}
	return s, nil
}

// Apply sets the resolved values in the Go runtime.
func (s Settings) Apply() {
	if s.setGC {
		debug.SetGCPercent(s.GCPercent)
	}
	if s.setLimit {
		debug.SetMemoryLimit(s.MemoryLimit)
	}
}

// String describes the settings for a log line.
func (s Settings) String() string {
	gc := strconv.Itoa(s.GCPercent)
	if s.GCPercent < 0 {
		gc = "off"
	}
	lim := "none"
	if s.MemoryLimit != NoLimit {
		lim = FormatSize(s.MemoryLimit)
	}
	return fmt.Sprintf("gc_percent=%s (%s) memory_limit=%s (%s)", gc, s.GCFrom, lim, s.LimitFrom)
}

// ParseGCPercent reads a GC percent as $GOGC does: "off" or -1 turns the collector
// off; otherwise a positive integer.
func ParseGCPercent(v string) (int, error) {
	v = strings.TrimSpace(v)
	if strings.EqualFold(v, "off") || v == "-1" {
		return -1, nil
	}
	p, err := strconv.Atoi(v)
	if err != nil || p <= 0 {
		return 0, fmt.Errorf("%q: want a positive integer or off", v)
	}
	return p, nil
}

// units are GOMEMLIMIT's suffixes (runtime/debug: B, KiB, MiB, GiB, TiB).
var units = []struct {
	suffix string
	shift  uint
}{{"TiB", 40}, {"GiB", 30}, {"MiB", 20}, {"KiB", 10}, {"B", 0}}

// ParseLimit reads a memory limit in GOMEMLIMIT's syntax (an integer number of bytes
// with an optional B, KiB, MiB, GiB or TiB suffix), or "none" / "off" / "0" for no
// limit (NoLimit).
func ParseLimit(v string) (int64, error) {
	v = strings.TrimSpace(v)
	switch strings.ToLower(v) {
	case "none", "off", "0", "max":
		return NoLimit, nil
	}
	num, shift := v, uint(0)
	for _, u := range units {
		if n, ok := strings.CutSuffix(v, u.suffix); ok {
			num, shift = n, u.shift
			break
		}
	}
	n, err := strconv.ParseInt(strings.TrimSpace(num), 10, 64)
	if err != nil || n <= 0 || n > NoLimit>>shift {
		return 0, fmt.Errorf("%q: want a size such as 512MiB or 2GiB (suffix B, KiB, MiB, GiB, TiB), or none", v)
	}
	return n << shift, nil
}

// FormatSize prints bytes in the largest unit that divides them, as ParseLimit reads.
func FormatSize(n int64) string {
	for _, u := range units {
		if u.shift > 0 && n%(1<<u.shift) == 0 {
			return strconv.FormatInt(n>>u.shift, 10) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10) + "B"
}

// CgroupMemoryLimit reads the container's memory limit from a cgroup file system
// (os.DirFS("/sys/fs/cgroup")): v2's memory.max, else v1's memory/memory.limit_in_bytes.
// It returns 0 when there is none ("max", v1's page-rounded MaxInt64, or unreadable).
func CgroupMemoryLimit(cgroup fs.FS) int64 {
	for _, name := range []string{"memory.max", "memory/memory.limit_in_bytes"} {
		b, err := fs.ReadFile(cgroup, name)
		if err != nil {
			continue
		}
		v := strings.TrimSpace(string(b))
		if v == "max" {
			return 0
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 || n >= 1<<62 { // v1 says "none" with ~MaxInt64
			return 0
		}
		return n
	}
	return 0
}
