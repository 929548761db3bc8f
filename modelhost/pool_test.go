package modelhost_test

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// TestCanceledCallDoesNotCorruptTheNextBatch: a caller that gives up while its rows are
// queued for a batch must not hand its pooled request buffers to the next request while
// the batcher still holds them (found in review: the next request got a 500 every time).
func TestCanceledCallDoesNotCorruptTheNextBatch(t *testing.T) {
	repo := lin16Repo(t, "batching: {max_batch_size: 64, max_delay: 100ms, instances: 1}\n")
	h := newHandler(t, repo)
	for iter := 0; iter < 20; iter++ {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Millisecond)
		a := httptest.NewRecorder()
		h.ServeHTTP(a, httptest.NewRequest("POST", "/v2/models/lin/infer", bytes.NewReader(inferBody(1))).WithContext(ctx))
		cancel()
		b := httptest.NewRecorder()
		h.ServeHTTP(b, httptest.NewRequest("POST", "/v2/models/lin/infer", bytes.NewReader(inferBody(4))))
		if b.Code != http.StatusOK {
			t.Fatalf("iteration %d: the caller after a canceled one got %d %s (canceled: %d)", iter, b.Code, b.Body.String(), a.Code)
		}
	}
}
