package policy

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Route is one rule of an app's routes: the targets it matches and where
// it sends them. A route matches a target when the target's host matches
// one of its host conditions (Domains, Suffixes, Prefixes), if it has any,
// and the target's port is in Ports, if it has any. Routes are immutable
// after Load.
type Route struct {
	Index int // position in the app's routes, from 0
	Line  int // line of the route in the policy file

	Domains  []string       // exact names, lower case, without a trailing dot
	Suffixes []string       // each matches itself and its subdomains; lower case, no trailing dot
	Prefixes []netip.Prefix // address ranges, masked
	Ports    []PortRange

	// Destination receives the matched targets; nil when Reject.
	Destination *Destination
	// Reject refuses the matched targets without dialling anything.
	Reject bool
}

// PortRange is an inclusive range of TCP ports.
type PortRange struct{ First, Last uint16 }

func (r PortRange) String() string {
	if r.First == r.Last {
		return strconv.Itoa(int(r.First))
	}
	return fmt.Sprintf("%d-%d", r.First, r.Last)
}

// hasHostCondition reports whether r says anything about the host.
func (r *Route) hasHostCondition() bool {
	return len(r.Domains) > 0 || len(r.Suffixes) > 0 || len(r.Prefixes) > 0
}

// matchHost reports whether host, as the client sent it, meets r's host
// conditions. A name is matched only against names and an address only
// against ranges: iapd routes before it resolves anything, so that a name
// sent to one destination is never resolved by another's servers.
func (r *Route) matchHost(host string) bool {
	if !r.hasHostCondition() {
		return true
	}
	if addr, err := netip.ParseAddr(host); err == nil {
		addr = addr.WithZone("").Unmap()
		for _, p := range r.Prefixes {
			if p.Contains(addr) {
				return true
			}
		}
		return false
	}

	name := normalizeName(host)
	for _, d := range r.Domains {
		if name == d {
			return true
		}
	}
	for _, s := range r.Suffixes {
		if name == s || strings.HasSuffix(name, "."+s) {
			return true
		}
	}
	return false
}

// matchPort reports whether port is in r's ports; every port is when r
// lists none.
func (r *Route) matchPort(port uint16) bool {
	if len(r.Ports) == 0 {
		return true
	}
	for _, pr := range r.Ports {
		if port >= pr.First && port <= pr.Last {
			return true
		}
	}
	return false
}

// normalizeName lower-cases a host name and drops its trailing dot.
func normalizeName(host string) string {
	return strings.ToLower(strings.TrimSuffix(host, "."))
}

// Describe returns r in one line for logs and explain output, like
// "routes[0] (domain_suffix corp.example; cidr 198.51.100.0/24) -> corp".
func (r *Route) Describe() string {
	var conds []string
	if len(r.Suffixes) > 0 {
		conds = append(conds, "domain_suffix "+strings.Join(r.Suffixes, ", "))
	}
	if len(r.Domains) > 0 {
		conds = append(conds, "domain "+strings.Join(r.Domains, ", "))
	}
	if len(r.Prefixes) > 0 {
		ps := make([]string, len(r.Prefixes))
		for i, p := range r.Prefixes {
			ps[i] = p.String()
		}
		conds = append(conds, "cidr "+strings.Join(ps, ", "))
	}
	if len(r.Ports) > 0 {
		ps := make([]string, len(r.Ports))
		for i, p := range r.Ports {
			ps[i] = p.String()
		}
		conds = append(conds, "port "+strings.Join(ps, ", "))
	}
	to := "reject"
	if r.Destination != nil {
		to = r.Destination.Name
	}
	return fmt.Sprintf("routes[%d] (%s) -> %s", r.Index, strings.Join(conds, "; "), to)
}

// matchRoute returns the first route of app that matches host and port, or
// nil when the app's own destination applies. Without a port (a name
// looked up by the app's DNS listener, whose connection port is not known
// yet) a route's port condition is ignored, so that a name that some
// connections send to a destination is resolved by that destination
// alone; routes with a port condition and no host condition are skipped.
func (app *App) matchRoute(host string, port uint16, hasPort bool) *Route {
	for _, r := range app.Routes {
		if !hasPort && !r.hasHostCondition() {
			continue
		}
		if !r.matchHost(host) {
			continue
		}
		if hasPort && !r.matchPort(port) {
			continue
		}
		return r
	}
	return nil
}
