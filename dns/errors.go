package dns

import (
	"errors"
	"net/netip"
	"strconv"
	"strings"
)

// Errors that callers branch on. A failed lookup returns an *Error that
// wraps one of them.
var (
	// ErrNotFound means every name tried got NXDOMAIN or no address
	// records (NODATA) for both A and AAAA.
	ErrNotFound = errors.New("dns: name not found")

	// ErrNoAnswer means no server returned a usable answer before the
	// last wait ended: the servers were silent, failed (SERVFAIL,
	// REFUSED) or could not be reached.
	ErrNoAnswer = errors.New("dns: no server answered")

	// ErrInvalidName means the host is neither an IP address nor a valid
	// domain name, so nothing was sent.
	ErrInvalidName = errors.New("dns: invalid name")
)

// Error is the error of a failed lookup. Its Err wraps ErrNotFound,
// ErrNoAnswer, ErrInvalidName or the context's error, joined with the
// first server's failure when there was one.
type Error struct {
	Name        string           // host as the caller passed it
	AccessPoint string           // Config.Name of the resolver
	Servers     []netip.AddrPort // servers that were asked, in order
	Err         error
}

// Error returns the lookup failure as one line. The servers are listed
// only when the failure is not a plain "not found", because only then do
// they help to find the cause.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("resolving ")
	b.WriteString(strconv.Quote(e.Name))
	b.WriteString(" via access point ")
	b.WriteString(strconv.Quote(e.AccessPoint))
	if len(e.Servers) > 0 && !errors.Is(e.Err, ErrNotFound) {
		b.WriteString(" with servers ")
		for i, s := range e.Servers {
			if i > 0 {
				b.WriteString(", ")
			}
			b.WriteString(s.String())
		}
	}
	b.WriteString(": ")
	b.WriteString(e.Err.Error())
	return b.String()
}

// Unwrap returns the cause, so errors.Is(err, ErrNotFound) works.
func (e *Error) Unwrap() error { return e.Err }
