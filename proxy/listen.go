package proxy

import (
	"context"
	"net"
	"time"
)

// Keep-alive probing of client connections: the first probe after
// keepAliveIdle without traffic, then every keepAliveInterval, and the
// connection is dropped after keepAliveCount unanswered probes. These are
// Go's defaults for net.Dialer and net.ListenConfig (Go 1.26), so that a
// client that vanished without a FIN does not hold its tunnel forever.
const (
	keepAliveIdle     = 15 * time.Second
	keepAliveInterval = 15 * time.Second
	keepAliveCount    = 9
)

// Listen opens a TCP listener on address for Serve. On Linux, accepted
// connections inherit the listening socket's keep-alive settings, so they
// are set there once instead of with four setsockopt(2) calls on every
// accepted connection; see tcp(7) and socket(7).
func Listen(ctx context.Context, address string) (net.Listener, error) {
	return ListenConfig().Listen(ctx, "tcp", address)
}
