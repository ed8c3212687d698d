// Package policy loads the YAML policy (listeners, apps, access points,
// destinations), validates it with file and line positions, and makes the
// pure decisions of a connection: which app a client is and which access
// points may carry its connection. It does no I/O beyond reading the file.
package policy

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
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

	// Interfaces holds the facts that the policy's interfaces section gives
	// about each interface it lists, by interface name. Link returns the facts
	// of any interface, with defaults for those not listed.
	Interfaces map[string]*Link

	// AccessPointOrder lists the access points in file order, so that
	// routing table and mark numbers are stable across runs.
	AccessPointOrder []*AccessPoint

	Routing Routing
	Control Control
	Limits  Limits
}

// Limits bound what one client may take. A loaded policy has every field
// set, to its default when the file leaves it out.
type Limits struct {
	HandshakeTimeout time.Duration // SOCKS5 negotiation or HTTP request headers, from accept; default 10s
	DialTimeout      time.Duration // one dial, over all access points tried; default 30s
	IdleTimeout      time.Duration // tunnels with no byte moving either way; 0 means never; default 1h
	MaxHeaderBytes   int           // HTTP request line and headers; default 65536
	AuthFailureDelay time.Duration // wait after a client address's failed login, doubling; 0 means none; default 250ms
}

// Routing holds the numbers of the routing tables, firewall marks and rules
// that iapd installs for access points bound to an interface. Access point
// i (its Index) uses table Table+i and mark Mark+i.
type Routing struct {
	Table        int    // first routing table number; default 18100
	Mark         uint32 // first firewall mark; default 0x1a900
	RulePriority int    // priority of iapd's lookup rules; default 18100, ahead of the main table's 32766, with the unreachable rules at RulePriority+1
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

	MaxConnections int            // client connections held at once; default 1024
	AllowClients   []netip.Prefix // client ranges allowed to connect; nil allows every client

	// unknownUser is checked in place of a password when the user name is
	// unknown. See (*Listener).unknownUserSecret.
	unknownUser *secret
}

// HasUsers reports whether clients of l identify themselves by credentials.
func (l *Listener) HasUsers() bool { return len(l.Users) > 0 }

// AllowsClient reports whether a client connecting from addr may use l.
func (l *Listener) AllowsClient(addr netip.Addr) bool {
	if l.AllowClients == nil {
		return true
	}
	addr = addr.Unmap().WithZone("")
	for _, p := range l.AllowClients {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// User is one set of credentials on a listener and the app it identifies.
type User struct {
	Name string
	App  *App

	secret *secret // see password.go
}

// LogValue implements slog.LogValuer: the user name and app, never the
// password or its hash.
func (u User) LogValue() slog.Value {
	app := ""
	if u.App != nil {
		app = u.App.Name
	}
	return slog.GroupValue(slog.String("name", u.Name), slog.String("app", app))
}

// Format implements fmt.Formatter, printing the user name alone for every
// verb, so that printing a User cannot reveal its secret.
func (u User) Format(f fmt.State, _ rune) { io.WriteString(f, u.Name) }

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

	// Require narrows the access points that may carry the app's
	// connections; the zero value accepts every one.
	Require Requirement
	// Priority ranks the app's connections on a full access point: a
	// higher one displaces a connection of the lowest. Default 0.
	Priority int
	// MaxConnections caps the app's upstream connections at once; 0
	// means no cap of its own.
	MaxConnections int
	// AllowLocalTargets lets the app reach loopback, link-local and the
	// host's own addresses, which are refused otherwise.
	AllowLocalTargets bool
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

	Probe          *Probe // health probe; nil when the access point has none
	MaxConnections int    // upstream connections at once; 0 means no cap

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
// network, with the rules for choosing among them and for the connections
// open when the choice changes. Implicit destinations are made from an
// app's access_point and have the default rules.
type Destination struct {
	Name         string
	AccessPoints []*AccessPoint
	Implicit     bool

	Select    Selection
	Tolerance time.Duration // SelectLatency: latencies this close to the best count as equal; default 20ms
	RaceDelay time.Duration // SelectRace: wait before dialling the next access point; default 250ms
	// HoldDown is how long an access point must stay usable again before
	// new connections go back to it from one that carried them meanwhile.
	// Default 5s; zero fails back at once.
	HoldDown time.Duration
	OnLost   OnLost
	OnBetter OnBetter
}

// Defaults of a destination's rules.
const (
	DefaultTolerance = 20 * time.Millisecond
	DefaultRaceDelay = 250 * time.Millisecond
	DefaultHoldDown  = 5 * time.Second
)

// Selection is a destination's rule for ordering its usable access points.
type Selection uint8

// Selection rules.
const (
	// SelectPriority tries the access points in the policy's order.
	SelectPriority Selection = iota
	// SelectCost tries the lowest cost first, then the policy's order.
	SelectCost
	// SelectLatency tries the lowest probe latency first. Latencies within
	// the destination's Tolerance of the best count as equal, and among
	// those the access point in use keeps its place, so that jitter does
	// not move traffic back and forth.
	SelectLatency
	// SelectRoundRobin starts each new connection at the next access point.
	SelectRoundRobin
	// SelectRace dials the first access point, starts the next one when
	// the first has not connected within RaceDelay, and keeps whichever
	// connects first.
	SelectRace
)

var selectionNames = []string{"priority", "cost", "latency", "round-robin", "race"}

func (s Selection) String() string {
	if int(s) < len(selectionNames) {
		return selectionNames[s]
	}
	return "unknown"
}

// OnLost is the rule for the open connections of an access point
// that stops being usable.
type OnLost uint8

const (
	// OnLostClose closes them at once, so that applications reconnect
	// instead of waiting on a way out that is gone. The default.
	OnLostClose OnLost = iota
	// OnLostKeep leaves them open; they resume if the link comes back in
	// time, as TCP allows.
	OnLostKeep
)

func (o OnLost) String() string {
	if o == OnLostKeep {
		return "keep"
	}
	return "close"
}

// OnBetter is the rule for the open connections on other access points
// when a destination goes back to a better one.
type OnBetter uint8

const (
	// OnBetterKeep leaves them where they are. The default.
	OnBetterKeep OnBetter = iota
	// OnBetterClose closes them, so that applications reconnect through
	// the better access point.
	OnBetterClose
)

func (o OnBetter) String() string {
	if o == OnBetterClose {
		return "close"
	}
	return "keep"
}

// LinkType is the kind of network an interface leads to.
type LinkType string

// Link types. The empty type means the policy does not say.
const (
	LinkWifi     LinkType = "wifi"
	LinkEthernet LinkType = "ethernet"
	LinkCellular LinkType = "cellular"
	LinkVPN      LinkType = "vpn"
)

// Link holds the facts that the policy gives about one interface, which
// the cost rule and app requirements use.
type Link struct {
	Interface string
	Type      LinkType // empty when the policy does not say
	Cost      int      // lower is cheaper; default 0
	Metered   bool     // default true for cellular, false otherwise
}

// Link returns the facts about the interface called name: those of the
// interfaces section, or defaults (no type, cost 0, unmetered).
func (p *Policy) Link(name string) Link {
	if l, ok := p.Interfaces[name]; ok {
		return *l
	}
	return Link{Interface: name}
}

// Requirement narrows the access points that may carry an app's
// connections, like a phone app that asks for unmetered Wi-Fi. The zero
// value accepts every access point.
type Requirement struct {
	Types   []LinkType // accepted link types; empty accepts any
	Metered *bool      // nil accepts both; false only unmetered, true only metered
}

// IsZero reports whether r accepts every access point.
func (r Requirement) IsZero() bool { return len(r.Types) == 0 && r.Metered == nil }

// ProbeKind is what a health probe sends.
type ProbeKind uint8

// Probe kinds.
const (
	ProbeTCP  ProbeKind = iota + 1 // connect to host:port and close
	ProbeHTTP                      // GET a URL and expect a status
	ProbeDNS                       // resolve a name with the access point's resolver
)

func (k ProbeKind) String() string {
	switch k {
	case ProbeTCP:
		return "tcp"
	case ProbeHTTP:
		return "http"
	case ProbeDNS:
		return "dns"
	}
	return "unknown"
}

// Probe is an access point's health check. It is always sent out of the
// access point's own interface, and names in it are resolved by the access
// point's own resolver.
type Probe struct {
	Kind   ProbeKind
	Target string // host:port for tcp, an http or https URL for http, a name for dns
	Status int    // ProbeHTTP: the expected status; default 200

	Interval  time.Duration // between probes; default 10s
	Timeout   time.Duration // for one probe; default 2s
	Failures  int           // consecutive failures that make the access point unusable; default 3
	Successes int           // consecutive successes that make it usable again; default 2
	// DialFailures is how many consecutive failed dials of real
	// connections make the access point unusable before the next probe
	// says so. Default 3; zero turns it off.
	DialFailures int
}

// Probe defaults.
const (
	DefaultProbeInterval     = 10 * time.Second
	DefaultProbeTimeout      = 2 * time.Second
	DefaultProbeFailures     = 3
	DefaultProbeSuccesses    = 2
	DefaultProbeDialFailures = 3
	DefaultProbeStatus       = 200
	MinProbeInterval         = 100 * time.Millisecond
)

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
