// Package xgboost evaluates XGBoost tree ensembles saved with Booster.save_model in the
// JSON format. Trees are flattened into one array of nodes; a row walks each tree with
// XGBoost's own rule (go left when value < split, missing values take the stored default
// branch), margins are summed in float32 per output group as XGBoost does, then the
// objective's transform is applied.
package xgboost

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"

	"github.com/patchbay-io/patchbay/modelhost/runtime"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// node is one tree node, 16 bytes. Trees are re-laid out at load so that a node's
// right child always follows its left child: a step goes to left or left+1. A leaf
// points to itself with rightMask 0, so a walk can take a fixed number of steps (the
// tree's depth) without testing for leaves, and several rows can walk in lockstep.
type node struct {
	value     float32 // split condition (a leaf's value is in Ensemble.leaf)
	feature   uint32  // split feature; defaultLeftBit set when missing values go left
	left      int32   // absolute index of the left child; a leaf's own index
	rightMask int32   // 1 for a split, 0 for a leaf
}

const defaultLeftBit = 1 << 31

type transform uint8

const (
	identity transform = iota
	sigmoid
	softmax
	argmax
)

// Ensemble is a loaded XGBoost model.
type Ensemble struct {
	nodes      []node
	leaf       []float32 // leaf value by node index
	roots      []int32
	depth      []int32 // steps from root to the deepest leaf, per tree
	group      []int32 // output group of each tree
	groups     int
	features   int
	baseMargin float32
	transform  transform
	outWidth   int  // output values per row
	out2D      bool // declared output shape is [-1, 1]
}

type jsonModel struct {
	Learner struct {
		Params struct {
			BaseScore string `json:"base_score"`
			NumClass  string `json:"num_class"`
			NumFeat   string `json:"num_feature"`
		} `json:"learner_model_param"`
		Objective struct {
			Name string `json:"name"`
		} `json:"objective"`
		Booster struct {
			Name  string `json:"name"`
			Model struct {
				Trees    []jsonTree `json:"trees"`
				TreeInfo []int      `json:"tree_info"`
			} `json:"model"`
		} `json:"gradient_booster"`
	} `json:"learner"`
	Version []int `json:"version"`
}

type jsonTree struct {
	Left        []int32   `json:"left_children"`
	Right       []int32   `json:"right_children"`
	SplitIdx    []int64   `json:"split_indices"`
	SplitCond   []float32 `json:"split_conditions"`
	DefaultLeft []int     `json:"default_left"`
	SplitType   []int     `json:"split_type"`
}

// Load reads spec.Artifact and checks that the declared signature fits the model: one
// FP32 input [-1, num_feature] and one FP32 output [-1] (or [-1, num_class] for
// multi:softprob).
func Load(spec runtime.Spec) (runtime.Model, error) {
	raw, err := os.ReadFile(spec.Artifact)
	if err != nil {
		return nil, fmt.Errorf("xgboost: %w", err)
	}
	e, err := Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("xgboost %s: %w", spec.Artifact, err)
	}
	if err := e.checkSignature(spec); err != nil {
		return nil, fmt.Errorf("xgboost %s: %w", spec.Artifact, err)
	}
	return e, nil
}

func (e *Ensemble) checkSignature(spec runtime.Spec) error {
	if len(spec.Inputs) != 1 || len(spec.Outputs) != 1 {
		return errors.New("signature: want exactly one input and one output")
	}
	in, out := spec.Inputs[0], spec.Outputs[0]
	if in.Datatype != tensor.FP32 || len(in.Shape) != 2 || in.Shape[1] != int64(e.features) {
		return fmt.Errorf("signature: input %q must be FP32 [-1, %d] (the model's num_feature), got %s %s",
			in.Name, e.features, in.Datatype, tensor.FormatShape(in.Shape))
	}
	if out.Datatype != tensor.FP32 {
		return fmt.Errorf("signature: output %q must be FP32, got %s", out.Name, out.Datatype)
	}
	if e.outWidth == 1 {
		e.out2D = len(out.Shape) == 2
		if !(len(out.Shape) == 1 || (len(out.Shape) == 2 && out.Shape[1] == 1)) {
			return fmt.Errorf("signature: output %q must have shape [-1] or [-1, 1], got %s", out.Name, tensor.FormatShape(out.Shape))
		}
	} else if len(out.Shape) != 2 || out.Shape[1] != int64(e.outWidth) {
		return fmt.Errorf("signature: output %q must have shape [-1, %d] (num_class), got %s", out.Name, e.outWidth, tensor.FormatShape(out.Shape))
	}
	return nil
}

func parseParam(s, name string) (float64, error) {
	s = strings.Trim(s, "[] ")
	if s == "" {
		return 0, nil
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return 0, fmt.Errorf("learner_model_param.%s: %q is not a number", name, s)
	}
	return v, nil
}

// Parse builds an Ensemble from XGBoost's JSON model.
func Parse(raw []byte) (*Ensemble, error) {
	var m jsonModel
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("parse model JSON: %w", err)
	}
	l := &m.Learner
	if l.Booster.Name != "gbtree" {
		return nil, fmt.Errorf("booster %q not supported (want gbtree)", l.Booster.Name)
	}
	base, err := parseParam(l.Params.BaseScore, "base_score")
	if err != nil {
		return nil, err
	}
	nclass, err := parseParam(l.Params.NumClass, "num_class")
	if err != nil {
		return nil, err
	}
	nfeat, err := parseParam(l.Params.NumFeat, "num_feature")
	if err != nil {
		return nil, err
	}
	if nfeat < 1 || nfeat > 1<<20 || nclass < 0 || nclass > 1<<16 {
		return nil, fmt.Errorf("num_feature %v / num_class %v out of range", nfeat, nclass)
	}
	e := &Ensemble{features: int(nfeat), groups: 1, outWidth: 1}
	switch obj := l.Objective.Name; obj {
	case "binary:logistic", "reg:logistic":
		// XGBoost stores base_score in probability space for logistic objectives and
		// converts it to a margin before adding tree outputs.
		if base <= 0 || base >= 1 {
			return nil, fmt.Errorf("base_score %v must be in (0, 1) for %s", base, obj)
		}
		e.baseMargin = float32(-math.Log(1/base - 1))
		e.transform = sigmoid
	case "reg:squarederror", "reg:linear", "reg:absoluteerror", "reg:pseudohubererror", "binary:logitraw":
		e.baseMargin = float32(base)
	case "multi:softprob", "multi:softmax":
		if nclass < 2 {
			return nil, fmt.Errorf("%s needs num_class >= 2, got %v", obj, nclass)
		}
		e.groups = int(nclass)
		e.baseMargin = float32(base)
		if obj == "multi:softprob" {
			e.transform, e.outWidth = softmax, int(nclass)
		} else {
			e.transform = argmax
		}
	default:
		return nil, fmt.Errorf("objective %q not supported", obj)
	}
	trees := l.Booster.Model.Trees
	if len(l.Booster.Model.TreeInfo) != len(trees) {
		return nil, fmt.Errorf("tree_info has %d entries for %d trees", len(l.Booster.Model.TreeInfo), len(trees))
	}
	for ti, t := range trees {
		g := l.Booster.Model.TreeInfo[ti]
		if g < 0 || g >= e.groups {
			return nil, fmt.Errorf("tree %d: output group %d out of range", ti, g)
		}
		if err := e.addTree(&t, int32(g)); err != nil {
			return nil, fmt.Errorf("tree %d: %w", ti, err)
		}
	}
	return e, nil
}

func (e *Ensemble) addTree(t *jsonTree, group int32) error {
	n := len(t.Left)
	if n == 0 || len(t.Right) != n || len(t.SplitIdx) != n || len(t.SplitCond) != n || len(t.DefaultLeft) != n {
		return errors.New("node arrays are empty or of different lengths")
	}
	for _, st := range t.SplitType {
		if st != 0 {
			return errors.New("categorical splits are not supported")
		}
	}
	if len(e.nodes)+n > math.MaxInt32/2 {
		return errors.New("too many nodes")
	}
	for i := 0; i < n; i++ {
		l, r := t.Left[i], t.Right[i]
		if l == -1 && r == -1 {
			continue
		}
		// Children always follow their parent in XGBoost's layout; requiring it rules
		// out cycles in a damaged file.
		if l <= int32(i) || r <= int32(i) || int(l) >= n || int(r) >= n || l == r {
			return fmt.Errorf("node %d: children %d, %d out of order or range", i, l, r)
		}
		if f := t.SplitIdx[i]; f < 0 || f >= int64(e.features) {
			return fmt.Errorf("node %d: split feature %d outside num_feature %d", i, f, e.features)
		}
	}
	// Re-lay out breadth first from the root, siblings side by side.
	off := int32(len(e.nodes))
	e.nodes = append(e.nodes, node{})
	e.leaf = append(e.leaf, 0)
	queue := []int32{0}  // old indices, in new order
	slot := []int32{off} // their new absolute indices
	level := []int32{0}  // their depth
	depth := int32(0)
	for q := 0; q < len(queue); q++ {
		old, at := queue[q], slot[q]
		if len(queue) > n {
			return errors.New("a node is reachable twice")
		}
		depth = max(depth, level[q])
		nd := node{value: t.SplitCond[old], left: at}
		if l := t.Left[old]; l != -1 {
			nd.left, nd.rightMask = int32(len(e.nodes)), 1
			nd.feature = uint32(t.SplitIdx[old])
			if t.DefaultLeft[old] != 0 {
				nd.feature |= defaultLeftBit
			}
			e.nodes = append(e.nodes, node{}, node{})
			e.leaf = append(e.leaf, 0, 0)
			queue = append(queue, l, t.Right[old])
			slot = append(slot, nd.left, nd.left+1)
			level = append(level, level[q]+1, level[q]+1)
		} else {
			e.leaf[at] = t.SplitCond[old]
			nd.value = 0
		}
		e.nodes[at] = nd
	}
	e.roots = append(e.roots, off)
	e.depth = append(e.depth, depth)
	e.group = append(e.group, group)
	return nil
}

func b2i(b bool) int32 {
	if b {
		return 1
	}
	return 0
}

// step moves one level down without branching on the data: right when the value is
// not below the split, or when it is missing and the default branch is right.
func step(nodes []node, n int32, row []float32) int32 {
	nd := &nodes[n]
	f := nd.feature
	v := row[f&^defaultLeftBit]
	right := b2i(!(v < nd.value)) &^ (b2i(v != v) & int32(f>>31))
	return nd.left + right&nd.rightMask
}

// Features is the number of input columns the model reads.
func (e *Ensemble) Features() int { return e.features }

// Width is the number of output values per row.
func (e *Ensemble) Width() int { return e.outWidth }

// PredictRows writes the model's outputs for rows (row-major, Features() columns each)
// into out (Width() values per row). Four rows walk each tree in lockstep; each row's
// margin is still summed tree by tree in float32, in XGBoost's order.
func (e *Ensemble) PredictRows(rows []float32, out []float32) {
	nf, g, w := e.features, e.groups, e.outWidth
	nrows := len(rows) / nf
	nodes, leaf, roots, depth, group := e.nodes, e.leaf, e.roots, e.depth, e.group
	var buf [4 * 8]float32
	var m []float32
	if g <= 8 {
		m = buf[:4*g]
	} else {
		m = make([]float32, 4*g)
	}
	r := 0
	for ; r+4 <= nrows; r += 4 {
		x0 := rows[r*nf : (r+1)*nf]
		x1 := rows[(r+1)*nf : (r+2)*nf]
		x2 := rows[(r+2)*nf : (r+3)*nf]
		x3 := rows[(r+3)*nf : (r+4)*nf]
		for i := range m {
			m[i] = e.baseMargin
		}
		for ti, root := range roots {
			n0, n1, n2, n3 := root, root, root, root
			for d := depth[ti]; d > 0; d-- {
				n0 = step(nodes, n0, x0)
				n1 = step(nodes, n1, x1)
				n2 = step(nodes, n2, x2)
				n3 = step(nodes, n3, x3)
			}
			k := group[ti]
			m[k] += leaf[n0]
			m[int32(g)+k] += leaf[n1]
			m[2*int32(g)+k] += leaf[n2]
			m[3*int32(g)+k] += leaf[n3]
		}
		for j := range 4 {
			e.finish(m[j*g:(j+1)*g], out[(r+j)*w:(r+j+1)*w])
		}
	}
	for ; r < nrows; r++ {
		x := rows[r*nf : (r+1)*nf]
		mm := m[:g]
		for i := range mm {
			mm[i] = e.baseMargin
		}
		for ti, root := range roots {
			n := root
			for d := depth[ti]; d > 0; d-- {
				n = step(nodes, n, x)
			}
			mm[group[ti]] += leaf[n]
		}
		e.finish(mm, out[r*w:(r+1)*w])
	}
}

func (e *Ensemble) finish(m []float32, out []float32) {
	switch e.transform {
	case identity:
		out[0] = m[0]
	case sigmoid:
		out[0] = float32(1 / (1 + math.Exp(-float64(m[0]))))
	case softmax:
		mx := m[0]
		for _, v := range m[1:] {
			mx = max(mx, v)
		}
		var sum float64
		for i, v := range m {
			x := math.Exp(float64(v - mx))
			out[i] = float32(x)
			sum += x
		}
		for i := range out {
			out[i] = float32(float64(out[i]) / sum)
		}
	case argmax:
		best := 0
		for i, v := range m {
			if v > m[best] {
				best = i
			}
		}
		out[0] = float32(best)
	}
}

// Predict implements runtime.Model.
func (e *Ensemble) Predict(_ context.Context, in []*tensor.Tensor) ([]*tensor.Tensor, error) {
	x := in[0]
	rows := int(x.Shape[0])
	if len(x.F32) != rows*e.features {
		return nil, fmt.Errorf("xgboost: %d values for %d rows of %d features", len(x.F32), rows, e.features)
	}
	out := &tensor.Tensor{Datatype: tensor.FP32, F32: make([]float32, rows*e.outWidth)}
	if e.outWidth == 1 && !e.out2D {
		out.Shape = []int64{int64(rows)}
	} else {
		out.Shape = []int64{int64(rows), int64(e.outWidth)}
	}
	e.PredictRows(x.F32, out.F32)
	return []*tensor.Tensor{out}, nil
}
