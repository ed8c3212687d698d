package iface

import (
	"fmt"
	"net/netip"

	"iapd/policy"
)

// tableRoute is one route in one of iapd's routing tables, reduced to the
// fields iapd sets, so that desired and installed routes compare with ==.
type tableRoute struct {
	Table   int
	Dst     netip.Prefix
	Gateway netip.Addr // invalid for a route straight out of the link (scope link)
	IfIndex int
	OnLink  bool // RTNH_F_ONLINK: the gateway lies outside every network attached to the link
}

func (r tableRoute) String() string {
	s := r.Dst.String()
	if r.Gateway.IsValid() {
		s += " via " + r.Gateway.String()
	}
	s += fmt.Sprintf(" dev %d table %d", r.IfIndex, r.Table)
	if r.OnLink {
		s += " onlink"
	}
	return s
}

// desiredRoutes returns the routes that table should hold for ap, whose
// interface is ifc (nil when missing), with routes without gateway first
// because the kernel checks a gateway against the routes already in the
// table. It also returns the address families that have an address but no
// gateway, which get no default route.
//
// For each family that the interface has an address of, the table gets the
// interface's attached networks copied from the main table, so that on-link
// targets work. It also gets a default route via the policy's gateway, else
// via a main-table gateway on the interface, else straight out of a
// point-to-point or NOARP link.
func desiredRoutes(ap *policy.AccessPoint, table int, ifc *Interface) (routes []tableRoute, noGateway []string) {
	// The kernel deletes a link's routes when it goes down and rejects new
	// ones until it is up again.
	if ifc == nil || !ifc.Up {
		return nil, nil
	}

	var defaults []tableRoute
	for _, v6 := range []bool{false, true} {
		if !hasFamily(ap, ifc, v6) {
			continue
		}
		for _, p := range ifc.OnLink {
			if p.Addr().Is6() == v6 {
				routes = append(routes, tableRoute{Table: table, Dst: p, IfIndex: ifc.Index})
			}
		}

		def := tableRoute{Table: table, Dst: defaultPrefix(v6), IfIndex: ifc.Index}
		gw, ok := defaultGateway(ap, ifc, v6)
		if !ok {
			noGateway = append(noGateway, familyName(v6))
			continue
		}
		if gw.IsValid() {
			def.Gateway = gw
			def.OnLink = !isAttached(ifc, gw)
		}
		defaults = append(defaults, def)
	}
	return append(routes, defaults...), noGateway
}

// defaultGateway returns the next hop of ap's default route of the family
// of v6: the policy's gateway, else a main-table gateway on ifc. For a
// point-to-point or NOARP link without one it returns an invalid address,
// because packets go straight out of the link. It returns false when there
// is no way past the link's own networks.
func defaultGateway(ap *policy.AccessPoint, ifc *Interface, v6 bool) (netip.Addr, bool) {
	if gw, ok := ap.Gateway(v6); ok {
		return gw.Unmap(), true
	}
	if gw, ok := ifc.Gateway(v6); ok {
		return gw.Unmap(), true
	}
	// A tunnel or PPP link has no neighbours to resolve.
	return netip.Addr{}, ifc.PointToPoint || ifc.NoARP
}

// hasFamily reports whether connections of the family of v6 can leave ap's
// interface: it has a preferred address of that family or the policy names
// a source address of it.
func hasFamily(ap *policy.AccessPoint, ifc *Interface, v6 bool) bool {
	if _, ok := ap.Source(v6); ok {
		return true
	}
	_, ok := ifc.PreferredAddr(v6)
	return ok
}

// isAttached reports whether the kernel accepts gw as a gateway on ifc
// without the onlink flag. That holds for a gateway inside a network
// attached to the link, because desiredRoutes puts that network's route
// into the table first, and for an IPv6 link-local address.
func isAttached(ifc *Interface, gw netip.Addr) bool {
	if gw.Is6() && gw.IsLinkLocalUnicast() {
		return true
	}
	for _, p := range ifc.OnLink {
		if p.Contains(gw) {
			return true
		}
	}
	return false
}

func defaultPrefix(v6 bool) netip.Prefix {
	if v6 {
		return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	}
	return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
}

func familyName(v6 bool) string {
	if v6 {
		return "IPv6"
	}
	return "IPv4"
}
