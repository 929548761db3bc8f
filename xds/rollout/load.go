package rollout

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"go.yaml.in/yaml/v3"
)

// MaxFileSize bounds one rollout file; larger files are refused, not read.
const MaxFileSize = 4 << 20

// Error is one problem in a rollout file, located by file, line and field path.
type Error struct {
	File  string
	Line  int
	Field string
	Msg   string
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		b.WriteByte(':')
		b.WriteString(strconv.Itoa(e.Line))
	}
	b.WriteString(": ")
	if e.Field != "" {
		b.WriteString(e.Field)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// IsRolloutFile reports whether a directory entry name is read as a rollout file.
// Hidden files (editor swap files, Kubernetes' ..data links) are skipped.
func IsRolloutFile(name string) bool {
	if strings.HasPrefix(name, ".") {
		return false
	}
	ext := filepath.Ext(name)
	return ext == ".yaml" || ext == ".yml"
}

// File is one rollout file as read from disk: its content and what identifies that content
// (size and modification time), or the error that stopped the read.
type File struct {
	Path    string
	Data    []byte
	Size    int64
	ModTime time.Time
	Err     error
}

// Same reports whether two reads of a directory saw the same files with the same contents.
func Same(a, b []File) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		x, y := a[i], b[i]
		if x.Path != y.Path || x.Size != y.Size || !x.ModTime.Equal(y.ModTime) ||
			(x.Err == nil) != (y.Err == nil) || !bytes.Equal(x.Data, y.Data) {
			return false
		}
		if x.Err != nil && x.Err.Error() != y.Err.Error() {
			return false
		}
	}
	return true
}

// ReadDir reads every rollout file directly in dir (see IsRolloutFile; symlinks followed,
// directories skipped), in name order, without parsing. A file that cannot be read is
// returned with its Err; only an unreadable directory is an error.
func ReadDir(dir string) ([]File, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read rollout directory: %w", err)
	}
	var files []File
	for _, e := range entries {
		if !IsRolloutFile(e.Name()) {
			continue
		}
		p := filepath.Join(dir, e.Name())
		// Follow symlinks (ConfigMap mounts) but skip directories.
		st, err := os.Stat(p)
		if err == nil && st.IsDir() {
			continue
		}
		f := File{Path: p}
		if err == nil {
			f.Size, f.ModTime = st.Size(), st.ModTime()
			f.Data, f.Err = readBounded(p)
		} else {
			f.Err = err
		}
		files = append(files, f)
	}
	return files, nil
}

// LoadDir loads and validates every *.yaml / *.yml file directly in dir, in name order.
// All problems are returned at once, joined.
func LoadDir(dir string) (*Set, error) {
	files, err := ReadDir(dir)
	if err != nil {
		return nil, err
	}
	return LoadData(files)
}

// LoadData parses and validates files already read (see ReadDir). A call of more than one
// file goes through a package-wide Cache: a file whose path and bytes the previous such
// call parsed is not parsed again (the control plane's reload after a one-file edit parses
// one file). A call of one file (a validation of one document, as xds/kube does for every
// object) parses it and leaves the cache alone, so it does not evict the directory's
// entries. The result is the same either way; see Cache for what a caller must not change.
func LoadData(files []File) (*Set, error) {
	if len(files) <= 1 {
		return loadData(files, parseOnly)
	}
	return defaultCache.LoadData(files)
}

// parseOnly is Parse for loadData: the rollouts' checks are left to validate.
func parseOnly(name string, data []byte) ([]*Rollout, [][]check, error) {
	rs, err := Parse(name, data)
	return rs, nil, err
}

// loadData is LoadData with the parse of one file's bytes given: its rollouts, the
// checks of each (see checksOf; nil: validate works them out) and its problems.
func loadData(files []File, parse func(name string, data []byte) ([]*Rollout, [][]check, error)) (*Set, error) {
	var (
		set   Set
		plans [][]check
		errs  []error
	)
	for _, f := range files {
		if f.Err != nil {
			errs = append(errs, &Error{File: f.Path, Msg: f.Err.Error()})
			continue
		}
		rs, ps, err := parse(f.Path, f.Data)
		set.Rollouts = append(set.Rollouts, rs...)
		if ps == nil {
			ps = make([][]check, len(rs))
		}
		plans = append(plans, ps...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	// Validate what did parse even when something did not (a document with only unknown
	// fields is kept by Parse), so every problem is reported at once.
	if err := validate(set.Rollouts, plans); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return nil, joinSorted(errs)
	}
	return &set, nil
}

// joinSorted flattens joined errors and orders them by file, then line (stable: a file's
// unreadable or unparsable problems keep their order).
func joinSorted(errs []error) error {
	var flat []error
	var walk func(error)
	walk = func(e error) {
		if j, ok := e.(interface{ Unwrap() []error }); ok {
			for _, c := range j.Unwrap() {
				walk(c)
			}
			return
		}
		flat = append(flat, e)
	}
	for _, e := range errs {
		walk(e)
	}
	key := func(e error) (string, int) {
		var re *Error
		if errors.As(e, &re) {
			return re.File, re.Line
		}
		return "", 0
	}
	sort.SliceStable(flat, func(i, j int) bool {
		fi, li := key(flat[i])
		fj, lj := key(flat[j])
		if fi != fj {
			return fi < fj
		}
		return li < lj
	})
	return errors.Join(flat...)
}

// LoadFiles loads and validates the named files (a directory argument is read with LoadDir's rules).
func LoadFiles(paths ...string) (*Set, error) {
	var files []File
	for _, p := range paths {
		if st, err := os.Stat(p); err == nil && st.IsDir() {
			sub, err := ReadDir(p)
			if err != nil {
				files = append(files, File{Path: p, Err: err})
				continue
			}
			files = append(files, sub...)
			continue
		}
		data, err := readBounded(p)
		files = append(files, File{Path: p, Data: data, Err: err})
	}
	return LoadData(files)
}

func readBounded(p string) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("file larger than %d bytes", MaxFileSize)
	}
	return data, nil
}

// Parse decodes the rollout documents of one file strictly (unknown fields are errors),
// without cross-document validation. name is used in errors.
func Parse(name string, data []byte) ([]*Rollout, error) {
	nodes := yaml.NewDecoder(bytes.NewReader(data))
	strict := yaml.NewDecoder(bytes.NewReader(data))
	strict.KnownFields(true)
	var (
		out  []*Rollout
		errs []error
	)
	for doc := 0; ; doc++ {
		var n yaml.Node
		err := nodes.Decode(&n)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			errs = append(errs, locate(yamlError(name, err), data))
			break
		}
		r := &Rollout{}
		serr := strict.Decode(r)
		if isEmptyDoc(&n) {
			continue
		}
		if n.Content[0].Kind != yaml.MappingNode {
			errs = append(errs, &Error{File: name, Line: n.Content[0].Line, Msg: "a rollout document must be a mapping"})
			continue
		}
		if serr != nil {
			errs = append(errs, atLine(yamlError(name, serr), n.Content[0].Line))
			// Unknown fields leave the rest of the document decoded as written: keep it,
			// so its other problems are validated and reported with them. Any other
			// decode error (a wrong type) leaves fields empty: validating them would
			// only report the same mistake again in other words.
			if !onlyUnknownFields(serr) {
				continue
			}
		}
		r.Source = Position{File: name, Line: n.Content[0].Line}
		r.lines = map[string]int{}
		indexLines(n.Content[0], "", r.lines)
		r.applyDefaults()
		out = append(out, r)
	}
	if len(errs) > 0 {
		return out, errors.Join(errs...)
	}
	return out, nil
}

// onlyUnknownFields reports whether every problem of a strict decode is an unknown field.
func onlyUnknownFields(err error) bool {
	var te *yaml.TypeError
	if !errors.As(err, &te) || len(te.Errors) == 0 {
		return false
	}
	for _, m := range te.Errors {
		if !yamlUnknownRe.MatchString(m) {
			return false
		}
	}
	return true
}

func (r *Rollout) applyDefaults() {
	for i := range r.Versions {
		if r.Versions[i].Protocol == "" {
			r.Versions[i].Protocol = DefaultProtocol
		}
		if r.Versions[i].Host == "" {
			r.Versions[i].Host = DefaultHost
		}
	}
	if r.Analysis != nil {
		r.Analysis.applyDefaults()
	}
}

func isEmptyDoc(n *yaml.Node) bool {
	return n.Kind == 0 || (n.Kind == yaml.DocumentNode && (len(n.Content) == 0 ||
		(n.Content[0].Kind == yaml.ScalarNode && n.Content[0].Tag == "!!null")))
}

func indexLines(n *yaml.Node, path string, lines map[string]int) {
	switch n.Kind {
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := k.Value
			if path != "" {
				p = path + "." + k.Value
			}
			lines[p] = k.Line
			indexLines(v, p, lines)
		}
	case yaml.SequenceNode:
		for i, c := range n.Content {
			p := path + "[" + strconv.Itoa(i) + "]"
			lines[p] = c.Line
			indexLines(c, p, lines)
		}
	}
}

var (
	yamlLineRe    = regexp.MustCompile(`^(?:yaml: )?line (\d+): (.*)$`)
	yamlUnknownRe = regexp.MustCompile(`field (\S+) not found in type \S+`)
	yamlTypeRe    = regexp.MustCompile(`cannot unmarshal !!(\w+) .*into (\S+)`)
)

// yamlError turns a yaml.v3 error into file:line errors in the user's words.
func yamlError(file string, err error) error {
	var te *yaml.TypeError
	var msgs []string
	if errors.As(err, &te) {
		msgs = te.Errors
	} else {
		msgs = []string{err.Error()}
	}
	var errs []error
	for _, m := range msgs {
		e := &Error{File: file, Msg: m}
		if g := yamlLineRe.FindStringSubmatch(m); g != nil {
			e.Line, _ = strconv.Atoi(g[1])
			e.Msg = g[2]
		}
		if g := yamlUnknownRe.FindStringSubmatch(e.Msg); g != nil {
			e.Msg = fmt.Sprintf("unknown field %q", g[1])
		} else if g := yamlTypeRe.FindStringSubmatch(e.Msg); g != nil {
			e.Msg = fmt.Sprintf("wrong type: got %s, want %s", g[1], friendlyType(g[2]))
		}
		errs = append(errs, e)
	}
	sort.SliceStable(errs, func(i, j int) bool { return errs[i].(*Error).Line < errs[j].(*Error).Line })
	return errors.Join(errs...)
}

// locate gives a line to the YAML reader's problems that yaml.v3 reports without one: a
// byte it cannot read (invalid UTF-8, a control character) is on that byte's line; anything
// else without a line (an unexpected end of stream) is at the end of the file.
func locate(err error, data []byte) error {
	j, ok := err.(interface{ Unwrap() []error })
	if !ok {
		return err
	}
	for _, e := range j.Unwrap() {
		if re, ok := e.(*Error); ok && re.Line <= 0 {
			re.Line = badByteLine(data)
		}
	}
	return err
}

// atLine gives line to the problems in err that have none (a decoder error yaml.v3 reports
// without a place: the document's first line is the closest we know).
func atLine(err error, line int) error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range j.Unwrap() {
			if re, ok := e.(*Error); ok && re.Line <= 0 {
				re.Line = line
			}
		}
	}
	return err
}

// badByteLine is the line of the first byte YAML cannot read, or else the last line.
func badByteLine(data []byte) int {
	line := 1
	for i := 0; i < len(data); {
		r, size := utf8.DecodeRune(data[i:])
		if r == utf8.RuneError && size <= 1 {
			return line
		}
		if r == '\n' {
			if i+1 < len(data) {
				line++
			}
		} else if r < 0x20 && r != '\t' && r != '\r' || r == 0x7f || r == 0xfffe || r == 0xffff {
			return line
		}
		i += size
	}
	return line
}

func friendlyType(goType string) string {
	switch {
	case strings.HasPrefix(goType, "[]"):
		return "a list"
	case strings.HasPrefix(goType, "map["):
		return "a mapping"
	case goType == "int" || goType == "*int":
		return "an integer"
	case goType == "float64":
		return "a number"
	case goType == "bool":
		return "true or false"
	case goType == "string":
		return "a string"
	default:
		return "a mapping"
	}
}
