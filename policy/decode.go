package policy

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// position is a place in the policy file. The zero value means "not in
// the file", which is how raw fields record that their key was absent.
type position struct {
	Line   int // 1-based
	Column int // 1-based, in characters
}

func posOf(n *yaml.Node) position { return position{Line: n.Line, Column: n.Column} }

// IsSet reports whether p is a real place in the file.
func (p position) IsSet() bool { return p.Line > 0 }

// text is a scalar value as written, with its position.
type text struct {
	Value string
	Pos   position // zero when the key is absent or its value was not a scalar
}

// IsSet reports whether the value was given as a scalar.
func (t text) IsSet() bool { return t.Pos.IsSet() }

// resolve follows an alias to the node it names.
func resolve(n *yaml.Node) *yaml.Node {
	for n != nil && n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	return n
}

// isNull reports whether n is an empty value ("key:" with nothing after
// it, or null). Such a value is treated as if the key were absent.
func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.Tag == "!!null"
}

// describe names the kind of n for "must be X, found Y" messages.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a map"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if isNull(n) {
			return "an empty value"
		}
		return fmt.Sprintf("%q", n.Value)
	}
	return "nothing"
}

// expectKind reports whether n has the given kind, and adds an error at n
// when it does not. expected completes "must be ...", like "a list of
// listeners".
func expectKind(errs *ErrorList, path string, n *yaml.Node, kind yaml.Kind, expected string) bool {
	if n.Kind == kind {
		return true
	}
	errs.add(posOf(n), path, "must be %s, found %s", expected, describe(n))
	return false
}

// decodeText decodes a scalar into a text, adding an error at n when it is
// a list or map.
func decodeText(errs *ErrorList, path string, n *yaml.Node) text {
	n = resolve(n)
	if n.Kind != yaml.ScalarNode {
		errs.add(posOf(n), path, "must be a single value, found %s", describe(n))
		return text{}
	}
	return text{Value: n.Value, Pos: posOf(n)}
}

// decodeTextList decodes a list of scalars. An item that is not a scalar
// is reported and kept as an unset text, so that indexes stay those of
// the file.
func decodeTextList(errs *ErrorList, path string, n *yaml.Node, items string) []text {
	n = resolve(n)
	if n.Kind != yaml.SequenceNode {
		errs.add(posOf(n), path, "must be a list of %s, found %s", items, describe(n))
		return nil
	}
	list := make([]text, len(n.Content))
	for i, item := range n.Content {
		list[i] = decodeText(errs, fmt.Sprintf("%s[%d]", path, i), item)
	}
	return list
}

// decodeInt decodes a YAML integer (decimal, 0x hex, 0o octal or 0b
// binary, with optional underscores).
func decodeInt(errs *ErrorList, path string, n *yaml.Node) (int64, text, bool) {
	n = resolve(n)
	if n.Kind != yaml.ScalarNode || n.Tag != "!!int" {
		errs.add(posOf(n), path, "must be an integer, found %s", describe(n))
		return 0, text{}, false
	}
	t := text{Value: n.Value, Pos: posOf(n)}
	v, err := strconv.ParseInt(n.Value, 0, 64)
	if err != nil {
		errs.add(t.Pos, path, "integer %s out of range", n.Value)
		return 0, text{}, false
	}
	return v, t, true
}

// decodeCount decodes a connection count: an integer from 1 to
// maxConnectionsLimit.
func decodeCount(errs *ErrorList, path string, n *yaml.Node) (int64, bool) {
	value, t, ok := decodeInt(errs, path, n)
	if !ok {
		return 0, false
	}
	if value < 1 || value > maxConnectionsLimit {
		errs.add(t.Pos, path, "%s out of range 1 to %d", t.Value, maxConnectionsLimit)
		return 0, false
	}
	return value, true
}

// decodeIntIn decodes an integer from lo to hi. The error names the key,
// the last part of path.
func decodeIntIn(errs *ErrorList, path string, n *yaml.Node, lo, hi int64) (int64, bool) {
	value, t, ok := decodeInt(errs, path, n)
	if !ok {
		return 0, false
	}
	if value < lo || value > hi {
		key := path[strings.LastIndex(path, ".")+1:]
		errs.add(t.Pos, path, "%s %s out of range %d to %d", key, t.Value, lo, hi)
		return 0, false
	}
	return value, true
}

// eachField calls fn for every key of the mapping n that is in known, and
// adds errors for unknown, repeated and non-scalar keys. Keys with an empty
// value are skipped, as if absent.
func eachField(errs *ErrorList, n *yaml.Node, known []string, fn func(key string, value *yaml.Node)) {
	seen := make(map[string]int, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := resolve(n.Content[i]), resolve(n.Content[i+1])
		if k.Kind != yaml.ScalarNode {
			errs.add(posOf(k), "", "keys must be names, found %s", describe(k))
			continue
		}
		key := k.Value
		if k.Tag == "!!merge" {
			errs.add(posOf(k), "", "merge keys (<<) are not supported; write the fields out")
			continue
		}
		if !containsString(known, key) {
			errs.add(posOf(k), key, "%s", unknownKeyMessage(key, known))
			continue
		}
		if line, dup := seen[key]; dup {
			errs.add(posOf(k), key, "duplicate key (first at line %d)", line)
			continue
		}
		seen[key] = k.Line
		if isNull(v) {
			continue
		}
		fn(key, v)
	}
}

// namedEntry is one entry of a map keyed by name (apps, access points,
// destinations).
type namedEntry struct {
	Name  string
	Pos   position // of the key
	Value *yaml.Node
}

// eachNamed returns the entries of the mapping n in file order, adding
// errors for repeated names and for names outside [A-Za-z0-9._-]. Entries
// with invalid names are still returned, so that their contents are checked
// and references to them do not add a second error. An empty value stands
// for an empty map at the key.
func eachNamed(errs *ErrorList, n *yaml.Node) []namedEntry {
	seen := make(map[string]int, len(n.Content)/2)
	var entries []namedEntry
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := resolve(n.Content[i]), resolve(n.Content[i+1])
		if k.Kind != yaml.ScalarNode || k.Tag == "!!merge" {
			errs.add(posOf(k), "", "keys must be names, found %s", describe(k))
			continue
		}
		name := k.Value
		if line, dup := seen[name]; dup {
			errs.add(posOf(k), name, "duplicate name (first at line %d)", line)
			continue
		}
		seen[name] = k.Line
		if msg := checkName(name); msg != "" {
			errs.add(posOf(k), name, "%s", msg)
		}
		if isNull(v) {
			v = &yaml.Node{Kind: yaml.MappingNode, Line: k.Line, Column: k.Column}
		}
		entries = append(entries, namedEntry{Name: name, Pos: posOf(k), Value: v})
	}
	return entries
}

// checkName returns why name cannot name an app, access point or
// destination, or "" when it can. Names appear in logs, metrics and the
// control API unquoted, so they keep to a small character set.
func checkName(name string) string {
	if name == "" {
		return "empty name"
	}
	for _, r := range name {
		if !isNameChar(r) {
			return fmt.Sprintf("invalid name %q: use only letters, digits, '.', '_' and '-'", name)
		}
	}
	return ""
}

func isNameChar(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' ||
		r == '.' || r == '_' || r == '-'
}

func containsString(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// unknownKeyMessage suggests the known key closest to key, or lists them
// all when none is close.
func unknownKeyMessage(key string, known []string) string {
	best, bestDist := "", 3
	for _, k := range known {
		if d := editDistance(key, k); d < bestDist {
			best, bestDist = k, d
		}
	}
	if best != "" {
		return fmt.Sprintf("unknown key, did you mean %s?", best)
	}
	return "unknown key (known keys: " + strings.Join(known, ", ") + ")"
}

// editDistance is the Levenshtein distance between a and b, in bytes.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// decodeDuration decodes a Go duration (500ms, 2s, 1m30s). It adds an
// error at n when the value is not one or is negative.
func decodeDuration(errs *ErrorList, path string, n *yaml.Node) (time.Duration, text, bool) {
	t := decodeText(errs, path, n)
	if !t.IsSet() {
		return 0, text{}, false
	}
	d, err := time.ParseDuration(t.Value)
	switch {
	case err != nil:
		errs.add(t.Pos, path, "invalid duration %q: use a number with a unit, like 500ms or 2s", t.Value)
		return 0, text{}, false
	case d < 0:
		errs.add(t.Pos, path, "duration %s must not be negative", t.Value)
		return 0, text{}, false
	}
	return d, t, true
}

// decodeBool decodes a YAML boolean (true or false).
func decodeBool(errs *ErrorList, path string, n *yaml.Node) (bool, text, bool) {
	n = resolve(n)
	if n.Kind != yaml.ScalarNode || n.Tag != "!!bool" {
		errs.add(posOf(n), path, "must be true or false, found %s", describe(n))
		return false, text{}, false
	}
	t := text{Value: n.Value, Pos: posOf(n)}
	var v bool
	if err := n.Decode(&v); err != nil {
		errs.add(t.Pos, path, "must be true or false, found %s", describe(n))
		return false, text{}, false
	}
	return v, t, true
}
