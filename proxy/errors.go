package proxy

import (
	"errors"
	"fmt"
	"strings"
	"syscall"

	"iapd/policy"
)

// Errors that callers branch on.
var (
	// ErrInvalidTarget means the client asked for something that is not
	// host:port with a numeric port.
	ErrInvalidTarget = errors.New("proxy: invalid target")
	// ErrNotServed means a listener passed to Update or Retire is not
	// being served.
	ErrNotServed = errors.New("proxy: listener not served")
	// ErrLocalTarget means the target is, or resolves only to, a loopback,
	// link-local or unspecified address or one of the host's own, and the
	// app does not allow local targets.
	ErrLocalTarget = errors.New("proxy: target is a local address")
	// ErrAppLimit means the app has as many connections open as its
	// max_connections allows.
	ErrAppLimit = errors.New("proxy: app connection limit reached")
	// ErrAccessPointFull means the access point has as many connections
	// open as its max_connections allows, and none of them belongs to an
	// app of a lower priority.
	ErrAccessPointFull = errors.New("proxy: access point connection limit reached")
)

// DialError is the one error type of the dial path. When several access
// points were tried, Err is the first one's error and Rest joins the others,
// so that the reply to the client follows the preferred access point while
// the log shows every attempt.
type DialError struct {
	Op          string // "select", "admit", "resolve" or "connect": what Err comes from
	App         string
	AccessPoint string // access point that Err comes from; empty for "select"
	Destination string
	Interface   string
	Target      string // host:port as the client sent it
	Err         error
	Rest        error // errors of the access points tried after the first; nil if none
}

func (e *DialError) Error() string {
	var b strings.Builder
	switch e.Op {
	case "select":
		b.WriteString("choosing an access point to reach ")
	case "admit":
		b.WriteString("opening a connection to ")
	case "resolve":
		b.WriteString("resolving ")
	default:
		b.WriteString("connecting to ")
	}
	b.WriteString(e.Target)
	if e.App != "" {
		fmt.Fprintf(&b, " for app %q", e.App)
	}
	if e.AccessPoint != "" {
		fmt.Fprintf(&b, " through access point %q", e.AccessPoint)
		if e.Interface != "" {
			fmt.Fprintf(&b, " (%s)", e.Interface)
		}
	}
	b.WriteString(": ")

	// The SOCKS5 library picks its reply code by searching the error text,
	// and HTTP clients show it, so the reason comes first in plain words.
	if errors.Is(e.Err, policy.ErrNoUsableAccessPoint) || errors.Is(e.Err, ErrAccessPointFull) {
		b.WriteString("network is unreachable: ")
	}
	b.WriteString(e.Err.Error())
	return b.String()
}

func (e *DialError) Unwrap() error { return e.Err }

// failure is why a dial failed, in the classes that a SOCKS5 reply
// (RFC 1928 section 6) can express.
type failure uint8

const (
	failureHostUnreachable failure = iota
	failureNetworkUnreachable
	failureConnectionRefused
)

// classify returns the failure class of a dial error. Timeouts, names that
// do not resolve and EHOSTUNREACH are all "host unreachable"; a full
// access point, like an unusable one, is "network unreachable".
func classify(err error) failure {
	switch {
	case errors.Is(err, policy.ErrNoUsableAccessPoint), errors.Is(err, ErrAccessPointFull), errors.Is(err, syscall.ENETUNREACH):
		return failureNetworkUnreachable
	case errors.Is(err, syscall.ECONNREFUSED):
		return failureConnectionRefused
	}
	return failureHostUnreachable
}

// String returns the phrase that go-socks5 maps to the matching reply code.
// The library searches a dial error's text for "refused" and "network is
// unreachable" and replies "host unreachable" otherwise.
func (f failure) String() string {
	switch f {
	case failureNetworkUnreachable:
		return "network is unreachable"
	case failureConnectionRefused:
		return "connection refused"
	}
	return "host unreachable"
}

// isRefusal reports whether err means that the policy does not allow the
// connection, as opposed to a failure to make it. SOCKS5 answers these
// with "connection not allowed by ruleset".
func isRefusal(err error) bool {
	return errors.Is(err, policy.ErrNotAllowed) || errors.Is(err, ErrLocalTarget) || errors.Is(err, ErrAppLimit)
}
