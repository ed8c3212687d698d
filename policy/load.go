package policy

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"

	"go.yaml.in/yaml/v3"
)

// lookupEnv reads the environment variables that password_env names.
// Tests replace it.
var lookupEnv = os.LookupEnv

// Load reads and parses the policy file at path. See Parse for the errors.
func Load(path string) (*Policy, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading policy: %w", err)
	}
	return Parse(path, data)
}

// Parse parses and validates a policy from data; path is used only in
// messages and Policy.Path. When the policy has problems, the error is an
// ErrorList holding all of them, ordered by line, and the Policy is nil.
// Parse reads the environment variables that password_env names.
func Parse(path string, data []byte) (*Policy, error) {
	root, errs := parseYAML(data)
	if len(errs) > 0 {
		return nil, errs.finish(path)
	}

	// Decoding, compiling and validating each keep going after a problem,
	// so that one load reports everything there is to fix.
	var raw rawPolicy
	errs.merge("", raw.UnmarshalYAML(root))
	p, compileErrs := compile(&raw)
	errs = append(errs, compileErrs...)
	errs = append(errs, validate(&raw)...)
	if len(errs) > 0 {
		return nil, errs.finish(path)
	}

	sum := sha256.Sum256(data)
	p.Path = path
	p.Hash = hex.EncodeToString(sum[:])
	return p, nil
}

// yamlLine finds the line number in yaml.v3's syntax errors, which are
// plain strings like "yaml: line 3: did not find expected key".
var yamlLine = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// parseYAML parses data into a node tree and returns its root mapping. An
// empty file gives an empty mapping at line 1, so that the missing keys
// are reported like any others.
func parseYAML(data []byte) (*yaml.Node, ErrorList) {
	var errs ErrorList
	dec := yaml.NewDecoder(bytes.NewReader(data))

	var doc yaml.Node
	err := dec.Decode(&doc)
	if errors.Is(err, io.EOF) {
		return &yaml.Node{Kind: yaml.MappingNode, Line: 1, Column: 1}, nil
	}
	if err != nil {
		errs = append(errs, yamlSyntaxError(err))
		return nil, errs
	}

	var extra yaml.Node
	switch err := dec.Decode(&extra); {
	case err == nil:
		errs.add(posOf(&extra), "", "more than one YAML document; a policy is a single document")
		return nil, errs
	case !errors.Is(err, io.EOF):
		errs = append(errs, yamlSyntaxError(err))
		return nil, errs
	}

	if len(doc.Content) == 0 {
		return &yaml.Node{Kind: yaml.MappingNode, Line: 1, Column: 1}, nil
	}
	root := resolve(doc.Content[0])
	if isNull(root) {
		// A file of comments only.
		return &yaml.Node{Kind: yaml.MappingNode, Line: 1, Column: 1}, nil
	}
	return root, nil
}

// yamlParserProblems are the messages of yaml.v3's parser, as opposed to
// its scanner. For these, go.yaml.in/yaml/v3 v3.0.6 ((*parser).fail in
// decode.go) prints the 0-based line of the enclosing collection, so the
// 1-based line is one more.
var yamlParserProblems = map[string]bool{
	"did not find expected ',' or ']'":       true,
	"did not find expected ',' or '}'":       true,
	"did not find expected '-' indicator":    true,
	"did not find expected <document start>": true,
	"did not find expected <stream-start>":   true,
	"did not find expected key":              true,
	"did not find expected node content":     true,
	"found duplicate %TAG directive":         true,
	"found duplicate %YAML directive":        true,
	"found incompatible YAML document":       true,
	"found undefined tag handle":             true,
}

// yamlSyntaxError turns a syntax error of yaml.v3 into an Error with the
// line it names, when it names one.
func yamlSyntaxError(err error) *Error {
	e := &Error{Msg: "invalid YAML", Err: err}
	m := yamlLine.FindStringSubmatch(err.Error())
	if m == nil {
		return e
	}
	e.Line, _ = strconv.Atoi(m[1])
	if yamlParserProblems[m[2]] {
		e.Line++
	}
	e.Err = errors.New(m[2])
	return e
}
