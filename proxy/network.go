// Package proxy serves the SOCKS5 and HTTP front ends of iapd. It accepts
// client connections on the policy's listeners, identifies the app, dials
// the target out of the access point that the policy chooses, relays bytes
// and keeps a table of the live connections. It does not watch interfaces
// or speak DNS itself, because the Network it is given does both.
package proxy

import (
	"context"
	"net"
	"net/netip"

	"iapd/policy"
)

// Resolver resolves a host name through one access point's DNS servers.
type Resolver interface {
	LookupNetIP(ctx context.Context, host string) ([]netip.Addr, error)
}

// Dialer opens TCP connections out of one access point. The address passed
// to DialContext is always IP:port, never a name.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// Network is the live view of the host's access points that the proxy
// dials through. Its methods are called concurrently, on every connection.
type Network interface {
	// Conditions returns what plans need to know about the access points
	// now: usability, probe latency, hold-downs and link facts.
	Conditions() policy.Conditions
	// ReportDial tells how one dial through ap ended: err is nil when it
	// connected, and otherwise the *DialError of the attempt. Dials that
	// the client or a race abandoned are not reported. It must not block.
	ReportDial(ap *policy.AccessPoint, err error)
	// Dialer returns a dialer bound to ap's interface.
	Dialer(ap *policy.AccessPoint) Dialer
	// Resolver returns ap's own resolver.
	Resolver(ap *policy.AccessPoint) Resolver
	// Interface returns the name of ap's interface for logs and the
	// connection table; for the default interface, the name it resolves
	// to when known.
	Interface(ap *policy.AccessPoint) string
}
