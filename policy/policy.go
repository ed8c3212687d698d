// Package policy loads the YAML policy (listeners, apps, access points,
// destinations), validates it with file and line positions, and makes the
// pure decisions of a connection: which app a client is and which access
// points may carry its connection. It does no I/O beyond reading the file.
package policy

import (
	"errors"
	"net/netip"
	"time"
)

// DefaultInterface is the interface name that means "whichever interface
// holds the default route when dialling", with no binding.
const DefaultInterface = "default"

// Policy is a loaded, validated policy. It is immutable after Load returns
// and safe for concurrent use.
type Policy struct {
	Path      string // file it was loaded from
	Hash      string // hex SHA-256 of the file contents
	Listeners []*Listener

	Apps         map[string]*App
	AccessPoints map[string]*AccessPoint
	Destinations map[string]*Destination

	// AccessPointOrder lists the access points in file order, so that
	// routing table and mark numbers are stable across runs.
	AccessPointOrder []*AccessPoint

	Routing Routing
	Control Control
}

// Routing holds the numbers of the routing tables, firewall marks and rules
// that iapd installs for access points bound to an interface. Access point
// i (its Index) uses table Table+i and mark Mark+i.
type Routing struct {
	Table        int    // first routing table number; default 18100
	Mark         uint32 // first firewall mark; default 0x1a900
	RulePriority int    // priority of iapd's rules; default 18100, ahead of the main table's 32766
}

// Protocol is the protocol a listener speaks.
type Protocol uint8

// Listener protocols.
const (
	ProtocolSOCKS5 Protocol = iota + 1
	ProtocolHTTP
	ProtocolMixed // SOCKS5 or HTTP, told apart by the first byte
)

func (p Protocol) String() string {
	switch p {
	case ProtocolSOCKS5:
		return "socks5"
	case ProtocolHTTP:
		return "http"
	case ProtocolMixed:
		return "mixed"
	}
	return "unknown"
}

// Listener is an address iapd accepts on. Exactly one of App and Users is
// set: App when the port identifies the app, Users when credentials do.
type Listener struct {
	Listen   string // host:port as written in the policy
	Protocol Protocol
	App      *App
	Users    map[string]*User

	// unknownUser is checked in place of a password when the user name is
	// unknown; nil means dummySecret. See (*Listener).unknownUserSecret.
	unknownUser *secret
}

// HasUsers reports whether clients of l identify themselves by credentials.
func (l *Listener) HasUsers() bool { return len(l.Users) > 0 }

// User is one set of credentials on a listener and the app it identifies.
type User struct {
	Name string
	App  *App

	secret secret // see password.go
}

// App is one client application and the destination its connections use.
// A static access point binding is a Destination of one, marked Implicit.
type App struct {
	Name        string
	Destination *Destination // for targets that no route matches
	Routes      []*Route     // tried in order; the first that matches applies

	// AllowOverride lets a client choose an access point or destination
	// for one connection with a user name like "dev+cell".
	AllowOverride bool
	// choices maps each name a client may choose to the destination it
	// stands for: an access point stands for a destination of one.
	choices map[string]*Destination

	// DNSListen is the loopback address (host:port) of the app's DNS
	// listener, which answers with the app's routes; "" for none.
	DNSListen string
}

// AccessPoint is one way out: an interface with its own DNS servers.
type AccessPoint struct {
	Name      string
	Interface string // interface name, or DefaultInterface

	DNS         []netip.AddrPort // servers, port 53 unless written; empty when SystemDNS or AutoDNS
	SystemDNS   bool             // dns: system, only with interface: default
	AutoDNS     bool             // dns: auto: the interface's own servers, found at run time
	Search      []string         // search domains, without a trailing dot
	DNSTimeouts []time.Duration  // wait before asking the next server; default 1s, 2s, 4s, 8s

	Gateways []netip.Addr // next-hop routers from the policy, at most one per family
	Sources  []netip.Addr // source addresses from the policy, at most one per family

	// Proxy is the upstream gateway proxy that every connection of the
	// access point goes through, reached out of its interface; nil for
	// direct connections.
	Proxy *GatewayProxy

	Index int // position in AccessPointOrder
}

// IsDefault reports whether ap follows the default route instead of
// binding to a named interface.
func (ap *AccessPoint) IsDefault() bool { return ap.Interface == DefaultInterface }

// Gateway returns the configured gateway of the family of v6, if any.
func (ap *AccessPoint) Gateway(v6 bool) (netip.Addr, bool) { return pickFamily(ap.Gateways, v6) }

// Source returns the configured source address of the family of v6, if any.
func (ap *AccessPoint) Source(v6 bool) (netip.Addr, bool) { return pickFamily(ap.Sources, v6) }

func pickFamily(addrs []netip.Addr, v6 bool) (netip.Addr, bool) {
	for _, a := range addrs {
		if a.Unmap().Is6() == v6 {
			return a, true
		}
	}
	return netip.Addr{}, false
}

// Destination is an ordered group of access points that reach the same
// network. Implicit destinations are made from an app's access_point.
type Destination struct {
	Name         string
	AccessPoints []*AccessPoint
	Implicit     bool
}

// Errors that callers branch on.
var (
	// ErrCredentialsRequired means the listener identifies apps by
	// credentials and the client sent none.
	ErrCredentialsRequired = errors.New("policy: credentials required")
	// ErrBadCredentials means the user name is unknown or the password wrong.
	ErrBadCredentials = errors.New("policy: invalid user name or password")
	// ErrNoUsableAccessPoint means no access point of the destination can
	// carry a connection now.
	ErrNoUsableAccessPoint = errors.New("policy: no usable access point")
	// ErrNotAllowed means the policy refuses the connection: a route
	// rejects the target, or the client chose an access point or
	// destination that its app does not allow.
	ErrNotAllowed = errors.New("policy: connection not allowed")
)
