package bearer

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const tokA = "0123456789abcdef0123456789abcdef" // 32 bytes
const tokB = "fedcba9876543210fedcba9876543210-rotated"

func write(t *testing.T, path, s string, mtime time.Time) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(path, mtime, mtime); err != nil {
		t.Fatal(err)
	}
}

func TestLoadRefusesShortOrMissing(t *testing.T) {
	dir := t.TempDir()
	for name, content := range map[string]string{"short": "tooshort", "empty": "", "spaces": "   \n", "31": tokA[:31] + "\n"} {
		p := filepath.Join(dir, name)
		write(t, p, content, time.Now())
		if _, err := Load(p); err == nil || !strings.Contains(err.Error(), "want at least 32") {
			t.Errorf("%s: Load = %v, want a too-short error", name, err)
		}
	}
	if _, err := Load(filepath.Join(dir, "absent")); err == nil {
		t.Error("Load of a missing file succeeded")
	}
	p := filepath.Join(dir, "ok")
	write(t, p, tokA+"\n", time.Now())
	if _, err := Load(p); err != nil {
		t.Errorf("32-byte token with a newline: %v", err)
	}
}

func TestCheck(t *testing.T) {
	p := filepath.Join(t.TempDir(), "token")
	write(t, p, tokA, time.Now())
	tok, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		header string
		want   error
	}{
		{"Bearer " + tokA, nil},
		{"bearer " + tokA, nil},
		{"BEARER  " + tokA + " ", nil},
		{"", ErrMissing},
		{"Bearer", ErrMissing},
		{"Bearer ", ErrMissing},
		{"Basic " + tokA, ErrMissing},
		{tokA, ErrMissing},
		{"Bearer " + tokA[:31], ErrWrong},
		{"Bearer " + tokA + "x", ErrWrong},
		{"Bearer " + strings.ToUpper(tokA), ErrWrong},
	} {
		if err := tok.Check(c.header); !errors.Is(err, c.want) && err != c.want {
			t.Errorf("Check(%q) = %v, want %v", c.header, err, c.want)
		}
	}
}

// TestRotationAndFailClosed: a new token in the file takes over without a restart; a file
// that becomes unusable refuses everything until it is fixed.
func TestRotationAndFailClosed(t *testing.T) {
	p := filepath.Join(t.TempDir(), "token")
	t0 := time.Now().Add(-time.Hour)
	write(t, p, tokA, t0)
	tok, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	write(t, p, tokB, t0.Add(time.Second))
	if err := tok.Check("Bearer " + tokA); !errors.Is(err, ErrWrong) {
		t.Errorf("old token after rotation: %v, want ErrWrong", err)
	}
	if err := tok.Check("Bearer " + tokB); err != nil {
		t.Errorf("new token after rotation: %v", err)
	}
	write(t, p, "short", t0.Add(2*time.Second))
	if err := tok.Check("Bearer " + tokB); !errors.Is(err, ErrFile) {
		t.Errorf("after the file went bad: %v, want ErrFile", err)
	}
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	if err := tok.Check("Bearer " + tokB); !errors.Is(err, ErrFile) {
		t.Errorf("after the file was removed: %v, want ErrFile", err)
	}
	write(t, p, tokA, t0.Add(3*time.Second))
	if err := tok.Check("Bearer " + tokA); err != nil {
		t.Errorf("after the file was fixed: %v", err)
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"Bearer abc", "bearer  x ", "Basic x", "", "Bearer", " BeArEr\tx"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, h string) {
		tok, ok := Parse(h)
		if ok && (tok == "" || strings.TrimSpace(tok) != tok) {
			t.Fatalf("Parse(%q) = %q, true", h, tok)
		}
		if !ok && tok != "" {
			t.Fatalf("Parse(%q) = %q, false", h, tok)
		}
	})
}
