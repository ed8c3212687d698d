package policy

import (
	"fmt"
	"net/netip"
)

// validate makes the checks that look at more than one value of the raw
// policy: addresses shared between listeners, listeners open to other
// hosts without credentials or client ranges, user names within a
// listener, settings that contradict an access point's interface, and
// routing numbers against the number of access points.
func validate(raw *rawPolicy) ErrorList {
	var errs ErrorList
	validateListeners(&errs, raw.Listeners)
	for _, ap := range raw.AccessPoints {
		var apErrs ErrorList
		validateAccessPoint(&apErrs, ap)
		errs.merge("access_points."+ap.Name, apErrs.err())
	}
	for _, d := range raw.Destinations {
		validateDestination(&errs, d)
	}
	validateDNSListeners(&errs, raw)
	validateRouting(&errs, &raw.Routing, len(raw.AccessPoints))
	return errs
}

func validateListeners(errs *ErrorList, listeners []*rawListener) {
	for i, l := range listeners {
		path := fmt.Sprintf("listeners[%d]", i)

		// With port 0 the kernel picks a free port, so such listeners never
		// collide.
		if l.listenOK && l.listenPort != 0 {
			for j, other := range listeners[:i] {
				if other.listenOK && other.listenPort == l.listenPort && ListenOverlaps(l.listenAddr, other.listenAddr) {
					errs.add(l.Listen.Pos, path+".listen", "address %s overlaps listeners[%d].listen %s (line %d); each listener needs its own address and port",
						l.Listen.Value, j, other.Listen.Value, other.Listen.Pos.Line)
					break
				}
			}
		}

		if l.listenOK && !isLoopbackListen(l.listenAddr) && !l.usersPos.IsSet() && !l.allowClientsPos.IsSet() {
			errs.add(l.Listen.Pos, path+".listen",
				"%s accepts clients from other hosts, but the listener asks for no credentials and would serve anyone who reaches it as an open proxy; listen on 127.0.0.1 or [::1], add users, or list the client ranges to serve in allow_clients",
				l.Listen.Value)
		}

		seen := make(map[string]int)
		for j, u := range l.Users {
			if !u.Name.IsSet() {
				continue
			}
			if line, dup := seen[u.Name.Value]; dup {
				errs.add(u.Name.Pos, fmt.Sprintf("%s.users[%d].name", path, j), "duplicate user %q (first at line %d)", u.Name.Value, line)
				continue
			}
			seen[u.Name.Value] = u.Name.Pos.Line
		}
	}
}

// isLoopbackListen reports whether a listener on addr accepts connections
// from this host only. An invalid Addr stands for an empty host, which
// listens on every address.
func isLoopbackListen(addr netip.Addr) bool {
	return addr.IsValid() && addr.IsLoopback()
}

// ListenOverlaps reports whether listening on a and b with the same port
// would collide on Linux. An invalid Addr stands for an empty host, which
// listens on every address of both families, as "::" does; "0.0.0.0"
// covers every IPv4 address.
func ListenOverlaps(a, b netip.Addr) bool {
	isAll := func(x netip.Addr) bool { return !x.IsValid() || x.Is6() && x.IsUnspecified() }
	isAny4 := func(x netip.Addr) bool { return x.Is4() && x.IsUnspecified() }
	switch {
	case isAll(a) || isAll(b):
		return true
	case isAny4(a):
		return b.Is4()
	case isAny4(b):
		return a.Is4()
	}
	return a == b
}

func validateAccessPoint(errs *ErrorList, ap *rawAccessPoint) {
	iface := ap.Interface.Value
	if !ap.Interface.IsSet() {
		// Missing or invalid, already reported: the checks below depend on it.
		return
	}
	isDefault := iface == DefaultInterface

	if ap.dnsSystem.IsSet() {
		if !isDefault {
			errs.add(ap.dnsSystem, "dns",
				"\"system\" is allowed only with interface: default, because the host resolver sends queries out of whatever interface holds the default route, not %s; list the DNS servers of %s", iface, iface)
		}
		if ap.searchPos.IsSet() {
			errs.add(ap.searchPos, "search", "not allowed with dns: system, which takes its search domains from the host")
		}
		if ap.timeoutsPos.IsSet() {
			errs.add(ap.timeoutsPos, "dns_timeouts", "not allowed with dns: system, which uses the host resolver's timeouts")
		}
	}
	if ap.dnsAuto.IsSet() && isDefault {
		errs.add(ap.dnsAuto, "dns",
			"\"auto\" needs a named interface, because it asks the system for that interface's own servers; with interface: default use dns: system")
	}
	if p := ap.Proxy; p != nil && p.address != "" {
		hasDNS := len(ap.DNS) > 0 || ap.dnsAuto.IsSet() || ap.dnsSystem.IsSet()
		switch {
		case p.hostAddr.IsValid() && p.hostAddr.IsLoopback() && !isDefault:
			errs.add(p.URL.Pos, "proxy.url",
				"%s is a loopback address, which is not reached out of %s: connections would leave through whatever interface the local proxy chooses; give the gateway's address on %s",
				p.host, iface, iface)
		case p.hostAddr.IsValid() && p.hostAddr.Is6() && p.hostAddr.IsLinkLocalUnicast() && isDefault:
			errs.add(p.URL.Pos, "proxy.url", "link-local address %s needs a named interface; give the access point interface: NAME", p.hostAddr)
		case !p.hostAddr.IsValid() && !hasDNS:
			errs.add(p.URL.Pos, "proxy.url",
				"proxy host %q is a name, but the access point has no dns to resolve it; add dns or give the proxy's IP address", p.host)
		}
	}

	seen := make(map[netip.AddrPort]int)
	for _, s := range ap.DNS {
		path := fmt.Sprintf("dns[%d]", s.Index)
		addr := s.Addr.Addr()
		if line, dup := seen[s.Addr]; dup {
			errs.add(s.Pos, path, "duplicate DNS server %s (first at line %d)", s.Text, line)
			continue
		}
		seen[s.Addr] = s.Pos.Line

		switch {
		case addr.Unmap().IsLoopback() && !isDefault:
			errs.add(s.Pos, path,
				"%s is a loopback address: a local stub resolver forwards through whichever interface it chooses, so names could leak through another interface than %s; list the DNS servers of %s",
				s.Text, iface, iface)
		case addr.Is6() && addr.IsLinkLocalUnicast() && addr.Zone() == "" && isDefault:
			errs.add(s.Pos, path, "link-local address %s needs a zone naming its interface, like %s%%eth0", addr, addr)
		case addr.Is6() && addr.IsLinkLocalUnicast() && addr.Zone() != "" && !isDefault && addr.Zone() != iface:
			errs.add(s.Pos, path, "link-local address %s is on interface %s, but the access point uses %s", addr, addr.Zone(), iface)
		}
	}

	if isDefault {
		if ap.gatewayPos.IsSet() {
			errs.add(ap.gatewayPos, "gateway", "not allowed with interface: default, which follows the main table's default route")
		}
		if ap.sourcePos.IsSet() {
			errs.add(ap.sourcePos, "source", "not allowed with interface: default, which lets the kernel pick the source address")
		}
	}
	checkOnePerFamily(errs, "gateway", ap.Gateway)
	checkOnePerFamily(errs, "source", ap.Source)
}

// checkOnePerFamily adds an error for each address after the first of its
// family, because a connection uses one gateway or source per family.
func checkOnePerFamily(errs *ErrorList, key string, list []address) {
	var first4, first6 *address
	for i := range list {
		a := &list[i]
		first := &first4
		family := "IPv4"
		if a.Addr.Is6() {
			first, family = &first6, "IPv6"
		}
		if *first != nil {
			errs.add(a.Pos, fmt.Sprintf("%s[%d]", key, a.Index), "second %s address %s (first is %s at line %d); give at most one per family",
				family, a.Addr, (*first).Addr, (*first).Pos.Line)
			continue
		}
		*first = a
	}
}

func validateDestination(errs *ErrorList, d *rawDestination) {
	seen := make(map[string]int)
	for i, t := range d.AccessPoints {
		if !t.IsSet() {
			continue
		}
		if line, dup := seen[t.Value]; dup {
			errs.add(t.Pos, fmt.Sprintf("destinations.%s.access_points[%d]", d.Name, i), "access point %q listed twice (first at line %d)", t.Value, line)
			continue
		}
		seen[t.Value] = t.Pos.Line
	}
}

// validateDNSListeners checks that no two apps' DNS listeners share an
// address, and that none takes the TCP address of a proxy listener.
func validateDNSListeners(errs *ErrorList, raw *rawPolicy) {
	type first struct {
		path string
		line int
	}
	seen := make(map[netip.AddrPort]first)
	for _, a := range raw.Apps {
		if !a.dnsListenParsed {
			continue
		}
		path := "apps." + a.Name + ".dns_listen"
		if f, dup := seen[a.dnsListenAddr]; dup {
			errs.add(a.DNSListen.Pos, path, "address %s is taken by %s (line %d); give each app's DNS listener its own port", a.DNSListen.Value, f.path, f.line)
			continue
		}
		seen[a.dnsListenAddr] = first{path: path, line: a.DNSListen.Pos.Line}

		for i, l := range raw.Listeners {
			if l.listenOK && l.listenPort == a.dnsListenAddr.Port() && ListenOverlaps(l.listenAddr, a.dnsListenAddr.Addr()) {
				errs.add(a.DNSListen.Pos, path, "address %s overlaps listeners[%d].listen %s (line %d), and DNS listens on TCP as well; choose another port",
					a.DNSListen.Value, i, l.Listen.Value, l.Listen.Pos.Line)
				break
			}
		}
	}
}

// Routing tables the kernel reserves (see ip-route(8) and
// /etc/iproute2/rt_tables).
const (
	tableDefault = 253
	tableMain    = 254
	tableLocal   = 255
)

// validateRouting checks that the table and mark of every access point,
// counted up from the first number, stay valid.
func validateRouting(errs *ErrorList, r *rawRouting, accessPoints int) {
	if accessPoints == 0 {
		return
	}
	last := int64(accessPoints - 1)

	first, end := r.Table, r.Table+last
	switch {
	case end > 1<<31-1:
		errs.add(r.tablePos, "routing.table", "tables %d to %d (one per access point) go past 2147483647; choose a smaller first table", first, end)
	case first <= tableLocal && end >= tableDefault:
		errs.add(r.tablePos, "routing.table",
			"tables %d to %d (one per access point) include a table the kernel reserves (253 default, 254 main, 255 local); choose a first table above 255", first, end)
	}

	if r.Mark+last > 1<<32-1 {
		errs.add(r.markPos, "routing.mark", "marks %#x to %#x (one per access point) do not fit 32 bits; choose a smaller first mark", r.Mark, r.Mark+last)
	}
}
