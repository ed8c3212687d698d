// Package iface keeps a live view of the host's interfaces, addresses and
// default routes, installs iapd's per-access-point routing tables and rules,
// and dials connections bound to one access point's interface. It makes no
// policy decisions: it reports whether an access point can carry traffic and
// carries it when asked.
package iface

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"syscall"

	"iapd/policy"
)

// Errors that callers branch on. The two dial errors contain "network is
// unreachable" because the SOCKS5 front end maps that phrase to its reply
// 0x03 (network unreachable).
var (
	// ErrUnsupported means this operating system has no implementation of
	// interface monitoring, routing tables or bound dialing.
	ErrUnsupported = errors.New("iface: not supported on this operating system")
	// ErrMissingCapability means iapd lacks a Linux capability that an
	// access point bound to an interface needs.
	ErrMissingCapability = errors.New("iface: missing capability")
	// ErrInterfaceDown means the access point's interface is missing or
	// down at the moment of dialing.
	ErrInterfaceDown = errors.New("iface: interface down or missing: network is unreachable")
	// ErrNoAddress means the interface has no usable source address of the
	// target's address family.
	ErrNoAddress = errors.New("iface: no source address of the target's family: network is unreachable")
	// ErrUnknownAccessPoint means a dial went through a nil Dialer, which
	// Manager.Dialer returns for an access point not in its policy.
	ErrUnknownAccessPoint = errors.New("iface: unknown access point")
	// ErrNoRoute means the access point's routing table is not installed
	// yet, or has no route to the target. It wraps syscall.ENETUNREACH.
	ErrNoRoute = fmt.Errorf("iface: no route: %w", syscall.ENETUNREACH)
)

// Interface is the state of one network interface at the time of a
// snapshot. Values reached through a Snapshot are shared and must not be
// modified.
type Interface struct {
	Index        int
	Name         string
	Up           bool // administratively up (IFF_UP)
	Carrier      bool // lower layer up (IFF_LOWER_UP)
	PointToPoint bool // IFF_POINTOPOINT: tunnels, PPP
	NoARP        bool // IFF_NOARP: no link-layer neighbours, so a gateway is not needed
	Loopback     bool

	// Addrs lists every address with its prefix length, in kernel order.
	Addrs []netip.Prefix
	// Preferred lists the addresses fit to be a connection's source:
	// global scope, neither deprecated nor tentative (rtnetlink(7),
	// IFA_F_DEPRECATED and IFA_F_TENTATIVE), in kernel order.
	Preferred []netip.Addr
	// Gateways lists the next hops of main-table default routes through
	// this interface, lowest metric first.
	Gateways []netip.Addr
	// OnLink lists the destinations of main-table routes through this
	// interface that have no gateway: the networks directly attached.
	OnLink []netip.Prefix
}

// PreferredAddr returns the first preferred address of the family of v6.
func (ifc *Interface) PreferredAddr(v6 bool) (netip.Addr, bool) {
	for _, a := range ifc.Preferred {
		if a.Is6() == v6 {
			return a, true
		}
	}
	return netip.Addr{}, false
}

// Gateway returns the first main-table gateway of the family of v6.
func (ifc *Interface) Gateway(v6 bool) (netip.Addr, bool) {
	for _, a := range ifc.Gateways {
		if a.Is6() == v6 {
			return a, true
		}
	}
	return netip.Addr{}, false
}

func (ifc *Interface) equal(o *Interface) bool {
	return ifc.Index == o.Index &&
		ifc.Name == o.Name &&
		ifc.Up == o.Up &&
		ifc.Carrier == o.Carrier &&
		ifc.PointToPoint == o.PointToPoint &&
		ifc.NoARP == o.NoARP &&
		ifc.Loopback == o.Loopback &&
		slices.Equal(ifc.Addrs, o.Addrs) &&
		slices.Equal(ifc.Preferred, o.Preferred) &&
		slices.Equal(ifc.Gateways, o.Gateways) &&
		slices.Equal(ifc.OnLink, o.OnLink)
}

// defaultRoute is a main-table default route reduced to what a snapshot
// needs. Gateway is invalid for a route straight out of a point-to-point
// link.
type defaultRoute struct {
	IfIndex int
	Gateway netip.Addr
	Metric  int
	V6      bool
}

// Snapshot is the state of all interfaces at one moment. It is immutable
// and safe for concurrent use; the zero value and nil have no interfaces.
type Snapshot struct {
	ifaces   []*Interface // ordered by index
	byName   map[string]*Interface
	byIndex  map[int]*Interface
	defaults []defaultRoute // ordered by metric, kernel order among equals
}

// newSnapshot builds a snapshot from interfaces and main-table default
// routes. It fills each interface's Gateways from defaults, so callers
// leave that field empty.
func newSnapshot(ifs []Interface, defaults []defaultRoute) *Snapshot {
	s := &Snapshot{
		byName:  make(map[string]*Interface, len(ifs)),
		byIndex: make(map[int]*Interface, len(ifs)),
	}
	for i := range ifs {
		ifc := ifs[i]
		s.ifaces = append(s.ifaces, &ifc)
	}
	slices.SortStableFunc(s.ifaces, func(a, b *Interface) int { return a.Index - b.Index })
	for _, ifc := range s.ifaces {
		s.byName[ifc.Name] = ifc
		s.byIndex[ifc.Index] = ifc
	}

	// Routes to links the dump did not list are dropped: they belong to a
	// link that disappeared between the two dumps.
	for _, r := range defaults {
		if _, ok := s.byIndex[r.IfIndex]; ok {
			s.defaults = append(s.defaults, r)
		}
	}
	slices.SortStableFunc(s.defaults, func(a, b defaultRoute) int { return a.Metric - b.Metric })
	for _, r := range s.defaults {
		ifc := s.byIndex[r.IfIndex]
		if r.Gateway.IsValid() && !slices.Contains(ifc.Gateways, r.Gateway) {
			ifc.Gateways = append(ifc.Gateways, r.Gateway)
		}
	}
	return s
}

// Interfaces returns the interfaces ordered by index. The slice is the
// caller's; the Interface values are shared.
func (s *Snapshot) Interfaces() []*Interface {
	if s == nil {
		return nil
	}
	return slices.Clone(s.ifaces)
}

// Interface returns the interface named name.
func (s *Snapshot) Interface(name string) (*Interface, bool) {
	if s == nil {
		return nil, false
	}
	ifc, ok := s.byName[name]
	return ifc, ok
}

// ByIndex returns the interface with index i.
func (s *Snapshot) ByIndex(i int) (*Interface, bool) {
	if s == nil {
		return nil, false
	}
	ifc, ok := s.byIndex[i]
	return ifc, ok
}

// Default returns the interface holding the main table's default route of
// the family of v6 with the lowest metric, and that route's gateway. The
// gateway is invalid for a default route straight out of a point-to-point
// link.
func (s *Snapshot) Default(v6 bool) (*Interface, netip.Addr, bool) {
	if s == nil {
		return nil, netip.Addr{}, false
	}
	for _, r := range s.defaults {
		if r.V6 == v6 {
			return s.byIndex[r.IfIndex], r.Gateway, true
		}
	}
	return nil, netip.Addr{}, false
}

// HasAddr reports whether addr is an address of one of the interfaces,
// loopback included. Zones are ignored.
func (s *Snapshot) HasAddr(addr netip.Addr) bool {
	if s == nil {
		return false
	}
	addr = addr.Unmap().WithZone("")
	for _, ifc := range s.ifaces {
		for _, p := range ifc.Addrs {
			if p.Addr().Unmap() == addr {
				return true
			}
		}
	}
	return false
}

// Usable reports whether ap can carry a connection in this snapshot and,
// when it cannot, why, as a short phrase naming the interface. A bound
// access point needs its interface up with carrier, and an address with a
// way out (a gateway, a point-to-point link, or an attached network) in at
// least one family. It implements policy.Usability.
func (s *Snapshot) Usable(ap *policy.AccessPoint) (bool, string) {
	if ap.IsDefault() {
		for _, v6 := range []bool{false, true} {
			if _, _, ok := s.Default(v6); ok {
				return true, ""
			}
		}
		return false, "no default route"
	}

	ifc, ok := s.Interface(ap.Interface)
	switch {
	case !ok:
		return false, fmt.Sprintf("interface %s not found", ap.Interface)
	case !ifc.Up:
		return false, fmt.Sprintf("interface %s is down", ap.Interface)
	case !ifc.Carrier:
		return false, fmt.Sprintf("interface %s has no carrier", ap.Interface)
	case len(ifc.Preferred) == 0 && len(ap.Sources) == 0:
		return false, fmt.Sprintf("interface %s has no address", ap.Interface)
	}
	if v4, v6 := s.Families(ap); !v4 && !v6 {
		return false, fmt.Sprintf("interface %s has no route", ap.Interface)
	}
	return true, ""
}

// Families reports for each address family whether ap can carry a
// connection of it in this snapshot. For interface: default that is a
// main-table default route of the family. For a bound access point it is
// an address of the family (from the interface or the policy) and a way
// out: a gateway from the policy or the main table, a point-to-point or
// NOARP link, or at least a network attached to the link. It does not
// look at whether the link is up.
func (s *Snapshot) Families(ap *policy.AccessPoint) (v4, v6 bool) {
	if ap.IsDefault() {
		_, _, v4 = s.Default(false)
		_, _, v6 = s.Default(true)
		return v4, v6
	}
	ifc, ok := s.Interface(ap.Interface)
	if !ok {
		return false, false
	}
	return canCarry(ap, ifc, false), canCarry(ap, ifc, true)
}

// canCarry reports whether ifc has an address and a way out of the family
// of v6 for ap.
func canCarry(ap *policy.AccessPoint, ifc *Interface, v6 bool) bool {
	if !hasFamily(ap, ifc, v6) {
		return false
	}
	if _, ok := defaultGateway(ap, ifc, v6); ok {
		return true
	}
	for _, p := range ifc.OnLink {
		if p.Addr().Is6() == v6 && !(v6 && p.Addr().IsLinkLocalUnicast()) {
			return true
		}
	}
	return false
}

// Link returns the facts that p gives about the interface ap sends
// through in this snapshot: its own, or for interface: default the one
// that holds the default route, IPv4 first.
func (s *Snapshot) Link(p *policy.Policy, ap *policy.AccessPoint) policy.Link {
	if !ap.IsDefault() {
		return p.Link(ap.Interface)
	}
	for _, v6 := range []bool{false, true} {
		if ifc, _, ok := s.Default(v6); ok {
			return p.Link(ifc.Name)
		}
	}
	return policy.Link{Interface: policy.DefaultInterface}
}

// equal reports whether s and o describe the same state.
func (s *Snapshot) equal(o *Snapshot) bool {
	if s == nil || o == nil {
		return s == o
	}
	return slices.EqualFunc(s.ifaces, o.ifaces, (*Interface).equal) &&
		slices.Equal(s.defaults, o.defaults)
}

var _ policy.Usability = (*Snapshot)(nil)
