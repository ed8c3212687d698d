//go:build !linux

package cli

import (
	"errors"
	"syscall"
)

// errReusePort is the error of sharing a port between two listening
// sockets where iapd does not know the system's SO_REUSEPORT rules.
var errReusePort = errors.New("sharing a port between two listening sockets is supported on Linux only")

func setReusePort(syscall.Conn, bool) error { return errReusePort }

func withReusePort(func(network, address string, c syscall.RawConn) error) func(network, address string, c syscall.RawConn) error {
	return func(string, string, syscall.RawConn) error { return errReusePort }
}
