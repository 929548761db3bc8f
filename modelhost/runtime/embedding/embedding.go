// Package embedding is a two-tower / matrix-factorisation scorer: user and item
// embedding tables, a dot product, and the top k items for each user, the shape of a
// recommender's retrieval stage. Artifact:
//
//	{"top_k": 5,
//	 "users": {"ids": [1, 2], "vectors": [[...], [...]]},
//	 "items": {"ids": [1001, 1002], "vectors": [[...], [...]]}}
//
// Signature: input INT64 [-1] (or [-1, 1]) user ids; outputs INT64 [-1, k] item ids and
// FP32 [-1, k] scores, best first (ties by lower item id). An unknown user is scored with
// the mean user vector (a cold-start fallback), so one new user never fails a batch.
package embedding

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/patchbay-io/patchbay/modelhost/runtime"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// Model is a loaded embedding scorer.
type Model struct {
	dim     int
	k       int
	users   map[int64]int
	userVec []float32 // row-major, one row per user
	mean    []float32
	itemIDs []int64
	itemVec []float32
}

type table struct {
	IDs     []int64     `json:"ids"`
	Vectors [][]float32 `json:"vectors"`
}

type artifact struct {
	TopK  int   `json:"top_k"`
	Users table `json:"users"`
	Items table `json:"items"`
}

func flatten(name string, t table, dim int) ([]float32, error) {
	if len(t.IDs) != len(t.Vectors) || len(t.IDs) == 0 {
		return nil, fmt.Errorf("%s: %d ids for %d vectors", name, len(t.IDs), len(t.Vectors))
	}
	out := make([]float32, 0, len(t.IDs)*dim)
	for i, v := range t.Vectors {
		if len(v) != dim {
			return nil, fmt.Errorf("%s: vector %d has %d values, want %d", name, i, len(v), dim)
		}
		out = append(out, v...)
	}
	return out, nil
}

// Load reads the artifact and checks the declared signature against it.
func Load(spec runtime.Spec) (runtime.Model, error) {
	raw, err := os.ReadFile(spec.Artifact)
	if err != nil {
		return nil, fmt.Errorf("embedding: %w", err)
	}
	var a artifact
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&a); err != nil {
		return nil, fmt.Errorf("embedding %s: %w", spec.Artifact, err)
	}
	if len(a.Users.Vectors) == 0 {
		return nil, fmt.Errorf("embedding %s: no users", spec.Artifact)
	}
	m := &Model{dim: len(a.Users.Vectors[0]), k: a.TopK, users: make(map[int64]int, len(a.Users.IDs)), itemIDs: a.Items.IDs}
	if m.dim == 0 {
		return nil, fmt.Errorf("embedding %s: empty vectors", spec.Artifact)
	}
	if m.userVec, err = flatten("users", a.Users, m.dim); err != nil {
		return nil, fmt.Errorf("embedding %s: %w", spec.Artifact, err)
	}
	if m.itemVec, err = flatten("items", a.Items, m.dim); err != nil {
		return nil, fmt.Errorf("embedding %s: %w", spec.Artifact, err)
	}
	if m.k < 1 || m.k > len(m.itemIDs) {
		return nil, fmt.Errorf("embedding %s: top_k %d, want 1..%d (items)", spec.Artifact, m.k, len(m.itemIDs))
	}
	for i, id := range a.Users.IDs {
		if _, dup := m.users[id]; dup {
			return nil, fmt.Errorf("embedding %s: user id %d twice", spec.Artifact, id)
		}
		m.users[id] = i
	}
	m.mean = make([]float32, m.dim)
	for i := range a.Users.IDs {
		for j := range m.dim {
			m.mean[j] += m.userVec[i*m.dim+j] / float32(len(a.Users.IDs))
		}
	}
	if len(spec.Inputs) != 1 || len(spec.Outputs) != 2 {
		return nil, errors.New("embedding: signature: want one input (user ids) and two outputs (item ids, scores)")
	}
	in := spec.Inputs[0]
	if in.Datatype != tensor.INT64 || !(len(in.Shape) == 1 || (len(in.Shape) == 2 && in.Shape[1] == 1)) {
		return nil, fmt.Errorf("embedding: signature: input %q must be INT64 [-1] or [-1, 1], got %s %s", in.Name, in.Datatype, tensor.FormatShape(in.Shape))
	}
	ids, scores := spec.Outputs[0], spec.Outputs[1]
	want := tensor.FormatShape([]int64{-1, int64(m.k)})
	if ids.Datatype != tensor.INT64 || tensor.FormatShape(ids.Shape) != want {
		return nil, fmt.Errorf("embedding: signature: output %q must be INT64 %s, got %s %s", ids.Name, want, ids.Datatype, tensor.FormatShape(ids.Shape))
	}
	if scores.Datatype != tensor.FP32 || tensor.FormatShape(scores.Shape) != want {
		return nil, fmt.Errorf("embedding: signature: output %q must be FP32 %s, got %s %s", scores.Name, want, scores.Datatype, tensor.FormatShape(scores.Shape))
	}
	return m, nil
}

// Predict implements runtime.Model.
func (m *Model) Predict(_ context.Context, in []*tensor.Tensor) ([]*tensor.Tensor, error) {
	users := in[0].I64
	rows := len(users)
	ids := make([]int64, rows*m.k)
	scores := make([]float32, rows*m.k)
	for r, uid := range users {
		u := m.mean
		if i, ok := m.users[uid]; ok {
			u = m.userVec[i*m.dim : (i+1)*m.dim]
		}
		m.topK(u, ids[r*m.k:(r+1)*m.k], scores[r*m.k:(r+1)*m.k])
	}
	k := int64(m.k)
	return []*tensor.Tensor{
		{Datatype: tensor.INT64, Shape: []int64{int64(rows), k}, I64: ids},
		{Datatype: tensor.FP32, Shape: []int64{int64(rows), k}, F32: scores},
	}, nil
}

// topK keeps the best k items in ids/scores by insertion (k is small).
func (m *Model) topK(u []float32, ids []int64, scores []float32) {
	n := 0
	for i, id := range m.itemIDs {
		v := m.itemVec[i*m.dim : (i+1)*m.dim]
		var s float32
		for j, x := range u {
			s += x * v[j]
		}
		if n == len(ids) && !better(s, id, scores[n-1], ids[n-1]) {
			continue
		}
		p := n
		if n < len(ids) {
			n++
		} else {
			p = n - 1
		}
		for p > 0 && better(s, id, scores[p-1], ids[p-1]) {
			scores[p], ids[p] = scores[p-1], ids[p-1]
			p--
		}
		scores[p], ids[p] = s, id
	}
}

func better(s float32, id int64, s2 float32, id2 int64) bool {
	return s > s2 || (s == s2 && id < id2)
}
