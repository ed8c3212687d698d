package iface

import (
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// buildSnapshot turns netlink dumps into a snapshot: links, addresses of
// every family, and the main table's routes. It does no I/O, so tests feed
// it recorded values. Entries it cannot decode are skipped.
func buildSnapshot(links []netlink.Link, addrs []netlink.Addr, routes []netlink.Route) *Snapshot {
	ifs := make([]Interface, 0, len(links))
	pos := make(map[int]int, len(links)) // ifindex to position in ifs
	for _, l := range links {
		a := l.Attrs()
		if a == nil || a.Index <= 0 {
			continue
		}
		pos[a.Index] = len(ifs)
		ifs = append(ifs, Interface{
			Index:        a.Index,
			Name:         a.Name,
			Up:           a.Flags&net.FlagUp != 0,
			Carrier:      a.RawFlags&unix.IFF_LOWER_UP != 0,
			PointToPoint: a.Flags&net.FlagPointToPoint != 0,
			NoARP:        a.RawFlags&unix.IFF_NOARP != 0,
			Loopback:     a.Flags&net.FlagLoopback != 0,
		})
	}

	for _, a := range addrs {
		i, ok := pos[a.LinkIndex]
		if !ok {
			continue
		}
		p, ok := prefixFromIPNet(a.IPNet)
		if !ok {
			continue
		}
		ifc := &ifs[i]
		ifc.Addrs = append(ifc.Addrs, p)
		const unfit = unix.IFA_F_DEPRECATED | unix.IFA_F_TENTATIVE | unix.IFA_F_DADFAILED
		if a.Scope == unix.RT_SCOPE_UNIVERSE && a.Flags&unfit == 0 {
			ifc.Preferred = append(ifc.Preferred, p.Addr())
		}
	}

	var defaults []defaultRoute
	for _, r := range routes {
		if r.Table != unix.RT_TABLE_MAIN || r.Type != unix.RTN_UNICAST {
			continue
		}
		if r.Family != unix.AF_INET && r.Family != unix.AF_INET6 {
			continue
		}
		v6 := r.Family == unix.AF_INET6

		dst, ok := netip.Prefix{}, true
		if r.Dst != nil {
			dst, ok = prefixFromIPNet(r.Dst)
		}
		if !ok {
			continue
		}
		if !dst.IsValid() || dst.Bits() == 0 {
			defaults = append(defaults, defaultNextHops(r, v6)...)
			continue
		}

		// A route without gateway names a network attached to the link;
		// iapd copies these into its tables so that on-link targets work.
		i, ok := pos[r.LinkIndex]
		if ok && r.Gw == nil && len(r.MultiPath) == 0 {
			ifs[i].OnLink = append(ifs[i].OnLink, dst.Masked())
		}
	}
	return newSnapshot(ifs, defaults)
}

// defaultNextHops splits a default route into one entry per next hop.
func defaultNextHops(r netlink.Route, v6 bool) []defaultRoute {
	if len(r.MultiPath) == 0 {
		gw, _ := addrFromIP(r.Gw)
		return []defaultRoute{{IfIndex: r.LinkIndex, Gateway: gw, Metric: r.Priority, V6: v6}}
	}
	hops := make([]defaultRoute, 0, len(r.MultiPath))
	for _, nh := range r.MultiPath {
		gw, _ := addrFromIP(nh.Gw)
		hops = append(hops, defaultRoute{IfIndex: nh.LinkIndex, Gateway: gw, Metric: r.Priority, V6: v6})
	}
	return hops
}

// addrFromIP converts ip, unmapping IPv4 addresses held in 16 bytes.
func addrFromIP(ip net.IP) (netip.Addr, bool) {
	a, ok := netip.AddrFromSlice(ip)
	return a.Unmap(), ok
}

// prefixFromIPNet converts n, keeping the host bits: an interface address
// is 192.0.2.2/24, not 192.0.2.0/24.
func prefixFromIPNet(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, bits := n.Mask.Size()
	if bits == 0 {
		return netip.Prefix{}, false
	}
	if a.Is4In6() && bits == 128 {
		ones -= 96
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, ones), true
}
