package policy

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Error is one problem in a policy file, with the place it was found. It
// prints as "file:line:col: field.path: problem"; the line, column and path
// parts are left out when unknown.
type Error struct {
	File   string
	Line   int    // 1-based; 0 when unknown
	Column int    // 1-based, counted in characters; 0 when unknown
	Path   string // field path like "apps.mms.access_point"; empty for the whole file
	Msg    string
	Err    error // underlying cause, if any; printed after Msg
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
		if e.Column > 0 {
			fmt.Fprintf(&b, ":%d", e.Column)
		}
	}
	b.WriteString(": ")
	if e.Path != "" {
		b.WriteString(e.Path)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	if e.Err != nil {
		if e.Msg != "" {
			b.WriteString(": ")
		}
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

func (e *Error) Unwrap() error { return e.Err }

// Snippet returns the line of src that e points at, followed by a line with
// a caret under e's column, for showing the error in context. Tabs in the
// source line are kept in the caret line so that the caret lines up. It
// returns "" when src has no such line.
func (e *Error) Snippet(src []byte) string {
	if e.Line <= 0 {
		return ""
	}
	lines := strings.Split(string(src), "\n")
	if e.Line > len(lines) {
		return ""
	}
	line := strings.TrimRight(lines[e.Line-1], "\r")
	if e.Column <= 0 {
		return line
	}

	var caret strings.Builder
	for i, r := range []rune(line) {
		if i >= e.Column-1 {
			break
		}
		if r == '\t' {
			caret.WriteRune('\t')
		} else {
			caret.WriteRune(' ')
		}
	}
	caret.WriteRune('^')
	return line + "\n" + caret.String()
}

// ErrorList is every problem found in one load of a policy file, ordered by
// line and column. Parse and Load return it as their error, so callers can
// print each problem with errors.As.
type ErrorList []*Error

// Error joins the problems with newlines.
func (l ErrorList) Error() string {
	msgs := make([]string, len(l))
	for i, e := range l {
		msgs[i] = e.Error()
	}
	return strings.Join(msgs, "\n")
}

// Unwrap returns the problems, so that errors.Is and errors.As look into
// each of them.
func (l ErrorList) Unwrap() []error {
	errs := make([]error, len(l))
	for i, e := range l {
		errs[i] = e
	}
	return errs
}

// err returns l as an error, or nil when l is empty, so that a nil list
// never becomes a non-nil error interface.
func (l ErrorList) err() error {
	if len(l) == 0 {
		return nil
	}
	return l
}

// add appends a problem at p. path is relative to the value being decoded.
func (l *ErrorList) add(p position, path, format string, args ...any) {
	*l = append(*l, &Error{Line: p.Line, Column: p.Column, Path: path, Msg: fmt.Sprintf(format, args...)})
}

// addCause is add with an underlying cause printed after the message.
func (l *ErrorList) addCause(p position, path, msg string, cause error) {
	*l = append(*l, &Error{Line: p.Line, Column: p.Column, Path: path, Msg: msg, Err: cause})
}

// merge appends the problems in err, which come from decoding a child
// value, with prefix put in front of their paths. prefix is either a key
// ("apps.mms") or an index ("[2]"); err is nil or an ErrorList.
func (l *ErrorList) merge(prefix string, err error) {
	if err == nil {
		return
	}
	var child ErrorList
	if !errors.As(err, &child) {
		// Only our own decoders run below us, so this is a programming error;
		// keep the message rather than lose it.
		*l = append(*l, &Error{Path: prefix, Msg: err.Error()})
		return
	}
	for _, e := range child {
		e.Path = joinPath(prefix, e.Path)
		*l = append(*l, e)
	}
}

// joinPath joins two field path parts: "a" and "b" make "a.b", "a" and
// "[1]" make "a[1]".
func joinPath(prefix, path string) string {
	switch {
	case prefix == "":
		return path
	case path == "":
		return prefix
	case strings.HasPrefix(path, "["):
		return prefix + path
	}
	return prefix + "." + path
}

// finish sets the file name on every problem, drops exact duplicates (an
// aliased node is decoded once per alias) and sorts by position.
func (l ErrorList) finish(file string) ErrorList {
	seen := make(map[string]bool, len(l))
	out := l[:0]
	for _, e := range l {
		e.File = file
		if msg := e.Error(); !seen[msg] {
			seen[msg] = true
			out = append(out, e)
		}
	}
	slices.SortStableFunc(out, func(a, b *Error) int {
		return cmp.Or(cmp.Compare(a.Line, b.Line), cmp.Compare(a.Column, b.Column))
	})
	return out
}
