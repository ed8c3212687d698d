package cli

import (
	"errors"
	"fmt"
	"io"
	"os"

	"iapd/policy"
)

func validateCommand(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("validate", stderr)
	path := fs.String("c", defaultPolicyPath, "policy `file` to check")
	quiet := fs.Bool("q", false, "print nothing when the policy is valid")
	if err := parseFlags(fs, args); err != nil {
		return err
	}

	_, err := policy.Load(*path)
	if err == nil {
		if !*quiet {
			fmt.Fprintf(stdout, "%s: ok\n", *path)
		}
		return nil
	}

	printPolicyError(stderr, *path, err)
	return errSilent
}

// printPolicyError prints each problem of a policy on its own line,
// followed by the offending line of the file with a caret under the column.
func printPolicyError(w io.Writer, path string, err error) {
	var list policy.ErrorList
	if !errors.As(err, &list) {
		var one *policy.Error
		if !errors.As(err, &one) {
			fmt.Fprintf(w, "iapd: %v\n", err)
			return
		}
		list = policy.ErrorList{one}
	}

	src, _ := os.ReadFile(path)
	for _, e := range list {
		fmt.Fprintln(w, e.Error())
		if snippet := e.Snippet(src); snippet != "" {
			fmt.Fprintln(w, snippet)
		}
	}
	fmt.Fprintf(w, "%s: %d problem(s)\n", path, len(list))
}
