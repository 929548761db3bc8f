package xds

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"os"
	"sync"
)

// MinTokenBytes is the shortest admin token accepted: 32 bytes (e.g. 64 hex characters or
// 43 base64 ones from 32 random bytes would do; 32 characters of anything is the floor).
const MinTokenBytes = 32

// tokenSource holds the admin bearer token: fixed, or from a file re-read when its size or
// modification time changes (looked at on every mutation request: they are rare), so the token
// rotates without a restart. A file that changes to an unreadable or too short token fails
// closed: mutations are refused until it is fixed.
type tokenSource struct {
	path string

	mu     sync.Mutex
	digest [32]byte // sha256 of the token in force
	err    error    // the file's current content is not a usable token
	stamp  string
}

func newTokenSource(fixed, path string) (*tokenSource, error) {
	ts := &tokenSource{path: path}
	if path == "" {
		if err := checkToken([]byte(fixed)); err != nil {
			return nil, fmt.Errorf("admin token: %w", err)
		}
		ts.digest = sha256.Sum256([]byte(fixed))
		return ts, nil
	}
	if err := ts.reload(); err != nil {
		return nil, fmt.Errorf("admin token file %s: %w", path, err)
	}
	return ts, nil
}

func checkToken(tok []byte) error {
	if len(tok) < MinTokenBytes {
		return fmt.Errorf("the token is %d bytes, want at least %d (e.g. openssl rand -hex 32)", len(tok), MinTokenBytes)
	}
	return nil
}

func fileStamp(path string) (string, error) {
	st, err := os.Stat(path)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%d|%d", st.Size(), st.ModTime().UnixNano()), nil
}

// reload reads the file; on a bad token it records the error (failing closed).
func (ts *tokenSource) reload() error {
	stamp, err := fileStamp(ts.path)
	if err == nil {
		var b []byte
		if b, err = os.ReadFile(ts.path); err == nil {
			tok := bytes.TrimSpace(b)
			if err = checkToken(tok); err == nil {
				ts.digest = sha256.Sum256(tok)
			}
		}
	}
	ts.stamp, ts.err = stamp, err
	return err
}

// check reports whether got is the token in force, in constant time (digests of equal
// length are compared, so not even the token's length leaks).
func (ts *tokenSource) check(got string) (bool, error) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.path != "" {
		if stamp, err := fileStamp(ts.path); err != nil || stamp != ts.stamp {
			_ = ts.reload()
		}
	}
	if ts.err != nil {
		return false, fmt.Errorf("admin token file %s: %w", ts.path, ts.err)
	}
	d := sha256.Sum256([]byte(got))
	return subtle.ConstantTimeCompare(d[:], ts.digest[:]) == 1, nil
}
