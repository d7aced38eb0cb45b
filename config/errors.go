package config

import (
	"bytes"
	"encoding"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"
)

// Error is one problem in a config file or in a file it names, at the
// position of the offending text.
type Error struct {
	File      string
	Line, Col int    // 1-based; 0 when unknown
	Key       string // dotted config key ("relay.max_recipients", "listen[1].mode"); may be ""
	Msg       string
}

// Error formats the problem as "file:line:col: key: message".
func (e Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	line, col := e.Line, e.Col
	if line <= 0 {
		line, col = 1, 1
	}
	if col <= 0 {
		col = 1
	}
	fmt.Fprintf(&b, ":%d:%d: ", line, col)
	if e.Key != "" {
		b.WriteString(e.Key)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Errors is every problem found, in file order; Load and ParseTCPRules
// return it as their error.
type Errors []Error

// Error gives one problem per line.
func (es Errors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

// positions maps dotted key paths of one TOML document to where they are
// written, so that semantic problems found after decoding can point at the
// text that caused them.
type positions struct {
	at   map[string][2]int // path -> line, col
	path map[[2]int]string // line, col -> longest path starting there
	// exprs are the top-level key/value expressions.
	exprs []expr
	// bare are the values written without quotes (numbers, booleans,
	// dates), in file order: go-toml hands their text to a
	// TextUnmarshaler without saying where it was (textValueError).
	bare []bareValue
	// syntaxOK is false when the document does not parse.
	syntaxOK bool
}

// pos returns the position of path, or of its closest written ancestor
// (a missing key points at its table), or 1:1.
func (p *positions) pos(path string) (line, col int) {
	for path != "" {
		if lc, ok := p.at[path]; ok {
			return lc[0], lc[1]
		}
		i := strings.LastIndexAny(path, ".[")
		if i < 0 {
			break
		}
		path = path[:i]
	}
	return 1, 1
}

// mapPositions parses doc with go-toml's unstable parser and records the
// position of every table header, key and array element. A document with a
// syntax error yields the positions found before it.
func mapPositions(doc []byte) *positions {
	p := &positions{at: map[string][2]int{}, path: map[[2]int]string{}}
	var parser unstable.Parser
	parser.Reset(doc)
	arrays := map[string]int{} // resolved array-table path -> elements so far
	table := ""
	for parser.NextExpression() {
		e := parser.Expression()
		switch e.Kind {
		case unstable.Table, unstable.ArrayTable:
			it := e.Key()
			path := ""
			var first *unstable.Node
			for it.Next() {
				k := it.Node()
				if first == nil {
					first = k
				}
				path = joinKey(path, string(k.Data))
				if n := arrays[path]; n > 0 && !(e.Kind == unstable.ArrayTable && it.IsLast()) {
					path += "[" + strconv.Itoa(n-1) + "]"
				}
			}
			if e.Kind == unstable.ArrayTable {
				n := arrays[path]
				arrays[path] = n + 1
				path += "[" + strconv.Itoa(n) + "]"
			}
			table = path
			p.record(&parser, path, first)
		case unstable.KeyValue:
			path := p.keyValue(&parser, table, e)
			p.exprs = append(p.exprs, expr{path, int(e.Raw.Offset), int(e.Raw.Offset + e.Raw.Length)})
		}
	}
	p.syntaxOK = parser.Error() == nil
	return p
}

// bareValue is a value written without quotes, at its path and position.
type bareValue struct {
	path      string
	text      string // as go-toml hands it to UnmarshalText
	line, col int
	off       int // byte offset in the document
}

// expr is a top-level key/value expression: its key path and byte range.
type expr struct {
	path       string
	start, end int
}

// blankExpr returns doc with the top-level key/value expression holding
// line:col replaced by spaces (newlines kept, so positions stay), or
// ok=false when no such expression exists; path is the expression's key.
func (p *positions) blankExpr(doc []byte, line, col int) (out []byte, path string, ok bool) {
	off := 0
	for l := 1; l < line && off < len(doc); off++ {
		if doc[off] == '\n' {
			l++
		}
	}
	off += col - 1
	for _, e := range p.exprs {
		if off >= e.start && off < e.end {
			out = bytes.Clone(doc)
			for i := e.start; i < e.end; i++ {
				if out[i] != '\n' && out[i] != '\r' {
					out[i] = ' '
				}
			}
			p.bare = slices.DeleteFunc(p.bare, func(b bareValue) bool { return b.off >= e.start && b.off < e.end })
			return out, e.path, true
		}
	}
	return nil, "", false
}

func (p *positions) keyValue(parser *unstable.Parser, table string, kv *unstable.Node) string {
	it := kv.Key()
	path := table
	var first *unstable.Node
	for it.Next() {
		if first == nil {
			first = it.Node()
		}
		path = joinKey(path, string(it.Node().Data))
	}
	p.record(parser, path, first)
	p.record(parser, path, kv.Value()) // so decode errors at the value name the key
	p.value(parser, path, kv.Value())
	return path
}

func (p *positions) value(parser *unstable.Parser, path string, v *unstable.Node) {
	switch v.Kind {
	case unstable.Integer, unstable.Float, unstable.Bool, unstable.DateTime, unstable.LocalDate, unstable.LocalDateTime, unstable.LocalTime:
		s := parser.Shape(v.Raw).Start
		p.bare = append(p.bare, bareValue{path: path, text: string(v.Data), line: s.Line, col: s.Column, off: int(v.Raw.Offset)})
	case unstable.Array:
		i := 0
		for it := v.Children(); it.Next(); {
			el := it.Node()
			if el.Kind == unstable.Comment {
				continue
			}
			elPath := path + "[" + strconv.Itoa(i) + "]"
			p.record(parser, elPath, el)
			p.value(parser, elPath, el)
			i++
		}
	case unstable.InlineTable:
		for it := v.Children(); it.Next(); {
			if kv := it.Node(); kv.Kind == unstable.KeyValue {
				p.keyValue(parser, path, kv)
			}
		}
	}
}

func (p *positions) record(parser *unstable.Parser, path string, n *unstable.Node) {
	if n == nil || (n.Raw.Length == 0 && n.Raw.Offset == 0) {
		return
	}
	s := parser.Shape(n.Raw).Start
	lc := [2]int{s.Line, s.Column}
	if _, ok := p.at[path]; !ok {
		p.at[path] = lc
	}
	if old, ok := p.path[lc]; !ok || len(path) > len(old) {
		p.path[lc] = path
	}
}

func joinKey(prefix, key string) string {
	if prefix == "" {
		return key
	}
	return prefix + "." + key
}

// decodeErrors turns a go-toml error into Errors. fatal is true when
// decoding stopped early (syntax or type errors), so the struct is
// incomplete and semantic validation would only add noise.
func decodeErrors(file string, err error, pos *positions) (errs Errors, fatal bool) {
	var strictErr *toml.StrictMissingError
	if errors.As(err, &strictErr) {
		for i := range strictErr.Errors {
			de := &strictErr.Errors[i]
			msg := "unknown key"
			if strings.Contains(de.Error(), "missing table") {
				msg = "unknown table"
			}
			errs = append(errs, fromDecodeError(file, de, pos, msg))
		}
		return errs, false
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		return Errors{fromDecodeError(file, de, pos, friendlyDecodeMessage(strings.TrimPrefix(de.Error(), "toml: ")))}, true
	}
	if e, ok := pos.textValueError(file, err); ok {
		return Errors{e}, true
	}
	return Errors{{File: file, Line: 1, Col: 1, Msg: err.Error()}}, true
}

// textValueError places an error go-toml returned without a position: a
// value written without quotes (timeout = 60) for a key whose type reads
// text (Duration, Rate). go-toml passes the bare text to UnmarshalText and
// returns its error as is: the first such value in the file that fails
// the same way is the one.
func (p *positions) textValueError(file string, err error) (Error, bool) {
	for _, b := range p.bare {
		t, ok := typeAt(reflect.TypeFor[Config](), b.path)
		if !ok || !reflect.PointerTo(t).Implements(textUnmarshalerType) {
			continue
		}
		e := reflect.New(t).Interface().(encoding.TextUnmarshaler).UnmarshalText([]byte(b.text))
		if e != nil && e.Error() == err.Error() {
			return Error{File: file, Line: b.line, Col: b.col, Key: b.path, Msg: err.Error() + "; write it as a quoted string"}, true
		}
	}
	return Error{}, false
}

var textUnmarshalerType = reflect.TypeFor[encoding.TextUnmarshaler]()

// typeAt is the Go type that decodes the value at a dotted config path
// ("relay.timeout", "listen[1].addr", "policy.limits.user.rcpts[0]").
func typeAt(t reflect.Type, path string) (reflect.Type, bool) {
	for _, seg := range strings.Split(path, ".") {
		name, idx, _ := strings.Cut(seg, "[")
		for t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		switch t.Kind() {
		case reflect.Struct:
			f, ok := fieldByTag(t, name)
			if !ok {
				return nil, false
			}
			t = f.Type
		case reflect.Map:
			t = t.Elem()
		default:
			return nil, false
		}
		for ; idx != ""; _, idx, _ = strings.Cut(idx, "[") {
			if t.Kind() != reflect.Slice && t.Kind() != reflect.Array {
				return nil, false
			}
			t = t.Elem()
		}
	}
	return t, true
}

// fieldByTag finds the field of struct type t that go-toml decodes key into.
func fieldByTag(t reflect.Type, key string) (reflect.StructField, bool) {
	for i := range t.NumField() {
		f := t.Field(i)
		if tag, _, _ := strings.Cut(f.Tag.Get("toml"), ","); tag == key {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

func fromDecodeError(file string, de *toml.DecodeError, pos *positions, msg string) Error {
	line, col := de.Position()
	key, ok := pos.path[[2]int{line, col}]
	if !ok {
		key = strings.Join(de.Key(), ".")
	}
	return Error{File: file, Line: line, Col: col, Key: key, Msg: msg}
}

// sortErrors orders errors of one file by position, keeping the order of
// problems at the same place.
func sortErrors(errs Errors) {
	sort.SliceStable(errs, func(i, j int) bool {
		if errs[i].Line != errs[j].Line {
			return errs[i].Line < errs[j].Line
		}
		return errs[i].Col < errs[j].Col
	})
}
