// Package cli is the iapd command line: it parses subcommands and flags,
// builds the logger, wires the policy, interfaces, resolvers and front ends
// together for "run", and handles signals. It holds no proxy logic itself.
package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"runtime/debug"
)

// Version is the release version, set at build time with
// -ldflags "-X iapd/internal/cli.Version=v1.2.3".
var Version = "dev"

// Exit codes that scripts can rely on.
const (
	exitOK          = 0
	exitFailure     = 1 // the command ran and failed (invalid policy, reload rejected, nothing usable, ...)
	exitUsage       = 2 // the command line itself is wrong
	exitUnreachable = 3 // no iapd responds on the control socket
	exitTimeout     = 4 // iapd wait ran out of time
)

const usage = `usage: iapd <command> [flags]

commands:
  run       serve a policy:                          iapd run -c FILE
  validate  check a policy, list every problem:      iapd validate -c FILE
  status    show listeners, access points, destinations and apps
  conns     list live connections; -close ID closes one
  events    follow events, one line each, until interrupted
  reload    load the policy file again without dropping connections
  explain   show which access point a connection would use:
                                                     iapd explain -app NAME -target HOST:PORT
            without a daemon, with routes, DNS sources and probes:
                                                     iapd explain -c FILE -app NAME -target HOST:PORT [-probe]
  wait      block until something is usable:         iapd wait -access-point NAME [-timeout 30s]
                                                     iapd wait -destination NAME [-timeout 30s]
  version   print the version

The control commands talk to the running iapd over its socket (-socket
PATH, or $IAPD_SOCKET) and print JSON with -json.

Exit codes: 0 success; 1 failure; 2 wrong command line; 3 iapd not
reachable; 4 wait timed out.

Run "iapd <command> -h" for the flags of a command.
`

// Main runs the command line args (without the program name) and returns
// the process exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}

	var err error
	switch args[0] {
	case "run":
		err = runCommand(args[1:], stderr)
	case "validate":
		err = validateCommand(args[1:], stdout, stderr)
	case "status":
		err = statusCommand(args[1:], stdout, stderr)
	case "conns":
		err = connsCommand(args[1:], stdout, stderr)
	case "events":
		err = eventsCommand(args[1:], stdout, stderr)
	case "reload":
		err = reloadCommand(args[1:], stdout, stderr)
	case "explain":
		if hasPolicyFlag(args[1:]) {
			err = explainPolicyCommand(args[1:], stdout, stderr)
		} else {
			err = explainCommand(args[1:], stdout, stderr)
		}
	case "wait":
		err = waitCommand(args[1:], stdout, stderr)
	case "version", "-version", "--version":
		fmt.Fprintln(stdout, versionString())
		return exitOK
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return exitOK
	default:
		fmt.Fprintf(stderr, "iapd: unknown command %q\n\n%s", args[0], usage)
		return exitUsage
	}
	return exitCode(err, stderr)
}

// usageError marks a wrong command line, which exits with exitUsage.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// errSilent marks a failure whose details the command already printed.
var errSilent = errors.New("already reported")

func exitCode(err error, stderr io.Writer) int {
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, flag.ErrHelp):
		return exitOK
	case errors.Is(err, errSilent):
		return exitFailure
	}

	fmt.Fprintf(stderr, "iapd: %v\n", err)
	var (
		ue usageError
		re unreachableError
		te timeoutError
	)
	switch {
	case errors.As(err, &ue):
		return exitUsage
	case errors.As(err, &re):
		return exitUnreachable
	case errors.As(err, &te):
		return exitTimeout
	}
	return exitFailure
}

// newFlagSet returns a flag set that reports errors instead of exiting.
func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("iapd "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// parseFlags parses args and rejects positional arguments, which no
// subcommand takes.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("unexpected argument %q", fs.Arg(0))}
	}
	return nil
}

func versionString() string {
	v := Version
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, s := range info.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				v += " (" + s.Value[:12] + ")"
			}
		}
		v += " " + info.GoVersion
	}
	return "iapd " + v
}
