package proxy

import (
	"errors"
	"fmt"
	"net/http"
	"runtime/debug"
	"sync/atomic"
)

// errPanic is the error of an operation that panicked and was recovered.
var errPanic = errors.New("proxy: internal error")

// Stats counts what a Server refused, closed or recovered from since it
// was created. The counters only grow.
type Stats struct {
	ClientsRefused uint64 // closed at accept: address outside the listener's allow_clients
	ListenerFull   uint64 // closed at accept: listener at its max_connections
	AcceptRetries  uint64 // accept failures waited out, like EMFILE
	Displaced      uint64 // closed to make room for a higher priority app
	IdleClosed     uint64 // closed after the idle timeout
	AuthFailures   uint64 // logins with wrong or malformed credentials
	AuthDelayed    uint64 // logins that waited because their address had failed before
	Panics         uint64 // panics recovered while serving a connection
}

type stats struct {
	clientsRefused, listenerFull, acceptRetries, displaced, idleClosed,
	authFailures, authDelayed, panics atomic.Uint64
}

// Stats returns the current counters of s.
func (s *Server) Stats() Stats {
	return Stats{
		ClientsRefused: s.stats.clientsRefused.Load(),
		ListenerFull:   s.stats.listenerFull.Load(),
		AcceptRetries:  s.stats.acceptRetries.Load(),
		Displaced:      s.stats.displaced.Load(),
		IdleClosed:     s.stats.idleClosed.Load(),
		AuthFailures:   s.stats.authFailures.Load(),
		AuthDelayed:    s.stats.authDelayed.Load(),
		Panics:         s.stats.panics.Load(),
	}
}

// logPanic counts and logs a recovered panic with its stack.
func (s *Server) logPanic(what string, v any) {
	s.stats.panics.Add(1)
	s.logger.Error("recovered from panic", "while", what, "panic", fmt.Sprint(v), "stack", string(debug.Stack()), "unexpected", true)
}

// recoverConn ends the serving of one client connection that panicked,
// so that the daemon and its other connections go on. Defer it directly.
func (s *Server) recoverConn() {
	if v := recover(); v != nil {
		s.logPanic("serving a client", v)
	}
}

// recoverCopy turns a panic in a relay copy into *errp, so that the
// tunnel ends and the daemon goes on. Defer it directly.
//
// TODO: the libraries still start goroutines of their own for the hand-off
// (see handoff.go), which write the bytes they had buffered to the
// upstream; a panic in the libraries' code there ends the process.
func (s *Server) recoverCopy(errp *error) {
	if v := recover(); v != nil {
		s.logPanic("relaying", v)
		*errp = errPanic
	}
}

// recoverDial turns a panic while resolving or dialling into *errp. The
// HTTP transport dials on goroutines of its own. Defer it directly.
func (s *Server) recoverDial(errp **DialError, derr *DialError) {
	if v := recover(); v != nil {
		s.logPanic("dialling", v)
		derr.Op = "connect"
		derr.Err = errPanic
		*errp = derr
	}
}

// recoverHandler logs a panic of the HTTP handler and hands it on as
// http.ErrAbortHandler, which makes http.Server close the connection
// without logging it again. Defer it directly.
func (s *Server) recoverHandler() {
	if v := recover(); v != nil {
		if v != http.ErrAbortHandler {
			s.logPanic("serving an HTTP request", v)
		}
		panic(http.ErrAbortHandler)
	}
}
