// Package bearer checks "Authorization: Bearer <token>" against a token kept in a file that
// is re-read when it changes (a Kubernetes Secret rotated in place, a token file replaced by
// an operator), without a restart.
package bearer

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
)

// MinLen is the shortest token accepted: 32 bytes (e.g. 16 random bytes hex-encoded give
// exactly 32), so a guessable token is refused at start.
const MinLen = 32

// Errors a check returns. ErrFile wraps the reason a token file that was good at start can
// no longer be used; requests are then refused (fail closed) until the file is fixed.
var (
	ErrMissing = errors.New("missing bearer token (send Authorization: Bearer <token>)")
	ErrWrong   = errors.New("wrong bearer token")
	ErrFile    = errors.New("admin token file unusable")
)

// Token is a bearer token read from a file. It is safe for concurrent use.
type Token struct {
	path string

	mu    sync.Mutex
	stamp string
	sum   [sha256.Size]byte // of the current token
	err   error             // set while the file on disk is unusable
}

// Load reads path once; an unreadable file or a token shorter than MinLen is an error.
func Load(path string) (*Token, error) {
	t := &Token{path: path}
	if err := t.read(); err != nil {
		return nil, err
	}
	return t, nil
}

func (t *Token) fileStamp() (string, error) {
	st, err := os.Stat(t.path)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%d|%d|%d", st.Size(), st.ModTime().UnixNano(), st.Mode()), nil
}

// read loads the file; the caller holds mu (or owns t).
func (t *Token) read() error {
	stamp, err := t.fileStamp()
	if err != nil {
		return fmt.Errorf("admin token: %w", err)
	}
	b, err := os.ReadFile(t.path)
	if err != nil {
		return fmt.Errorf("admin token: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if len(tok) < MinLen {
		return fmt.Errorf("admin token file %s: token is %d bytes, want at least %d", t.path, len(tok), MinLen)
	}
	t.stamp, t.sum, t.err = stamp, sha256.Sum256([]byte(tok)), nil
	return nil
}

// current re-reads the file when it changed and returns the token's hash or why the file
// cannot be used.
func (t *Token) current() ([sha256.Size]byte, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	stamp, err := t.fileStamp()
	switch {
	case err != nil:
		t.stamp, t.err = "", fmt.Errorf("%w: %v", ErrFile, err)
	case stamp != t.stamp:
		if err := t.read(); err != nil {
			t.stamp, t.err = stamp, fmt.Errorf("%w: %v", ErrFile, err)
		}
	}
	return t.sum, t.err
}

// Parse takes the token out of an Authorization header value. The scheme is matched
// case-insensitively (RFC 9110 section 11.1); spaces around the token are ignored.
func Parse(header string) (string, bool) {
	header = strings.TrimSpace(header)
	scheme, tok, ok := strings.Cut(header, " ")
	if !ok || !strings.EqualFold(scheme, "bearer") {
		return "", false
	}
	tok = strings.TrimSpace(tok)
	return tok, tok != ""
}

// Check reports whether header (an Authorization value) carries the current token: nil,
// ErrMissing, ErrWrong, or an error wrapping ErrFile. The comparison is constant-time over
// SHA-256 digests, so neither the content nor the length of the token leaks through timing.
func (t *Token) Check(header string) error {
	want, err := t.current()
	if err != nil {
		return err
	}
	tok, ok := Parse(header)
	if !ok {
		return ErrMissing
	}
	got := sha256.Sum256([]byte(tok))
	if subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
		return ErrWrong
	}
	return nil
}
