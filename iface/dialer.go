package iface

import (
	"context"
	"fmt"
	"net"
	"net/netip"

	"iapd/policy"
)

// Dialer opens connections out of one access point's interface. It is safe
// for concurrent use. Get one from Manager.Dialer; a nil *Dialer returns
// ErrUnknownAccessPoint from every dial.
type Dialer struct {
	ap      *policy.AccessPoint
	mark    uint32 // SO_MARK selecting the access point's routing table; 0 for interface: default
	monitor *Monitor
	// routesReady reports whether the access point's table is installed;
	// nil means always.
	routesReady func() bool
}

// AccessPoint returns the access point d dials through.
func (d *Dialer) AccessPoint() *policy.AccessPoint {
	if d == nil {
		return nil
	}
	return d.ap
}

// DialContext connects to address, which must be an IP address and port:
// names are resolved by the access point's resolver beforehand, never here.
// The network is one of tcp, tcp4, tcp6, udp, udp4 and udp6.
//
// For an access point bound to an interface, the socket is bound to the
// interface that has its name at this moment, so a re-created interface is
// found under its new index. The socket gets a source address of the
// target's family from the policy or the interface, and the access point's
// firewall mark. Loopback targets are dialed unbound.
//
// A dial fails at once with an error wrapping ErrNoRoute while the access
// point's routing table is not installed, and for a target that the table
// has no route to: outside the interface's networks with no gateway of its
// family. The kernel would otherwise take such an IPv4 target for on-link,
// because for a socket bound to a device any failed route lookup means
// on-link (ip_route_output_key_hash_rcu in net/ipv4/route.c), and wait for
// neighbour resolution that never answers.
func (d *Dialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	if d == nil {
		return nil, fmt.Errorf("dialing %s %s: %w", network, address, ErrUnknownAccessPoint)
	}
	switch network {
	case "tcp", "tcp4", "tcp6", "udp", "udp4", "udp6":
	default:
		return nil, fmt.Errorf("dialing %s %s via access point %q: unsupported network %q", network, address, d.ap.Name, network)
	}
	target, err := netip.ParseAddrPort(address)
	if err != nil {
		return nil, fmt.Errorf("dialing %s %s via access point %q: address must be IP:port, because names are resolved before dialing: %w", network, address, d.ap.Name, err)
	}

	if d.ap.IsDefault() || target.Addr().Unmap().IsLoopback() {
		var nd net.Dialer
		return nd.DialContext(ctx, network, address)
	}

	ifc, err := d.boundInterface()
	if err != nil {
		return nil, fmt.Errorf("dialing %s %s via access point %q: %w", network, address, d.ap.Name, err)
	}
	src, err := d.source(ifc, target.Addr())
	if err != nil {
		return nil, fmt.Errorf("dialing %s %s via access point %q: %w", network, address, d.ap.Name, err)
	}
	if err := d.checkRoute(ifc, target.Addr()); err != nil {
		return nil, fmt.Errorf("dialing %s %s via access point %q: %w", network, address, d.ap.Name, err)
	}
	return d.dialBound(ctx, network, address, ifc, src)
}

// checkRoute returns an error wrapping ErrNoRoute when the access point's
// table is not installed or has no route to target.
//
// NOTE: readiness is what the last reconcile found. A link that goes down
// and up again between two reads of interface state leaves its table empty
// while it still counts as installed, until the next read repairs it; an
// IPv4 dial in that window can wait for neighbour resolution.
func (d *Dialer) checkRoute(ifc *Interface, target netip.Addr) error {
	if d.routesReady != nil && !d.routesReady() {
		return fmt.Errorf("routing table of interface %s not installed yet: %w", ifc.Name, ErrNoRoute)
	}
	target = target.Unmap()
	if target.IsLinkLocalUnicast() {
		return nil
	}
	if _, ok := defaultGateway(d.ap, ifc, target.Is6()); ok {
		return nil
	}
	for _, p := range ifc.OnLink {
		if p.Contains(target) {
			return nil
		}
	}
	return fmt.Errorf("%s is outside the networks of interface %s, which has no %s gateway: %w", target, ifc.Name, familyName(target.Is6()), ErrNoRoute)
}

// boundInterface returns the access point's interface from the current
// snapshot, or an error wrapping ErrInterfaceDown when it is missing, down
// or without carrier.
func (d *Dialer) boundInterface() (*Interface, error) {
	ifc, ok := d.monitor.Snapshot().Interface(d.ap.Interface)
	switch {
	case !ok:
		return nil, fmt.Errorf("interface %s not found: %w", d.ap.Interface, ErrInterfaceDown)
	case !ifc.Up:
		return nil, fmt.Errorf("interface %s is down: %w", d.ap.Interface, ErrInterfaceDown)
	case !ifc.Carrier:
		// Without carrier a connect would wait for its timeout.
		return nil, fmt.Errorf("interface %s has no carrier: %w", d.ap.Interface, ErrInterfaceDown)
	}
	return ifc, nil
}

// source picks the source address for a connection to target: the one in
// the policy, else the interface's first preferred address of the target's
// family. A link-local target gets none, so that the kernel picks the
// interface's link-local address.
func (d *Dialer) source(ifc *Interface, target netip.Addr) (netip.Addr, error) {
	target = target.Unmap()
	if target.IsLinkLocalUnicast() {
		return netip.Addr{}, nil
	}
	v6 := target.Is6()
	if a, ok := d.ap.Source(v6); ok {
		return a, nil
	}
	if a, ok := ifc.PreferredAddr(v6); ok {
		return a, nil
	}
	family := "IPv4"
	if v6 {
		family = "IPv6"
	}
	return netip.Addr{}, fmt.Errorf("interface %s has no %s address: %w", ifc.Name, family, ErrNoAddress)
}

// localAddr returns the net.Addr to bind for network, or nil when src is
// invalid and the kernel should choose.
func localAddr(network string, src netip.Addr) net.Addr {
	if !src.IsValid() {
		return nil
	}
	ap := netip.AddrPortFrom(src, 0)
	switch network {
	case "udp", "udp4", "udp6":
		return net.UDPAddrFromAddrPort(ap)
	}
	return net.TCPAddrFromAddrPort(ap)
}
