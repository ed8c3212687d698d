package policy

import (
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// rawRoute is one entry of an app's routes. It needs at least one
// condition and exactly one of destination, access_point and reject.
type rawRoute struct {
	Index int

	// DomainSuffix (key domain_suffix, optional) lists domain names that
	// match themselves and every name below them: corp.example matches
	// corp.example and www.corp.example. Case does not matter and a
	// trailing dot is dropped.
	DomainSuffix []text
	// Domain (key domain, optional) lists names that match only exactly.
	Domain []text
	// CIDR (key cidr, optional) lists address ranges (198.51.100.0/24,
	// 2001:db8:c::/48) or single addresses. They match targets that the
	// client sent as an address; names are matched only by domain and
	// domain_suffix, because routing comes before any name is resolved.
	CIDR []prefixEntry
	// Port (key port, optional) lists ports (443) and inclusive ranges
	// ("8000-8999"). With host conditions, a target must match both.
	Port []PortRange

	// Destination (key destination) sends the matched targets to this
	// destination.
	Destination text
	// AccessPoint (key access_point) sends them to this access point alone.
	AccessPoint text
	// Reject (key reject) refuses them: true is the only value.
	Reject position

	pos position
}

// prefixEntry is one valid entry of a route's cidr list.
type prefixEntry struct {
	Prefix netip.Prefix
	Pos    position
}

var routeKeys = []string{"domain_suffix", "domain", "cidr", "port", "destination", "access_point", "reject"}

func (r *rawRoute) UnmarshalYAML(n *yaml.Node) error {
	var errs ErrorList
	r.pos = posOf(n)
	if !expectKind(&errs, "", n, yaml.MappingNode, "a map (keys: "+strings.Join(routeKeys, ", ")+")") {
		return errs.err()
	}

	eachField(&errs, n, routeKeys, func(key string, v *yaml.Node) {
		switch key {
		case "domain_suffix", "domain":
			for i, t := range decodeScalarOrList(&errs, key, v, "domain names") {
				name, ok := parseRouteDomain(&errs, fmt.Sprintf("%s[%d]", key, i), t)
				if !ok {
					continue
				}
				entry := text{Value: name, Pos: t.Pos}
				if key == "domain" {
					r.Domain = append(r.Domain, entry)
				} else {
					r.DomainSuffix = append(r.DomainSuffix, entry)
				}
			}
		case "cidr":
			for i, t := range decodeScalarOrList(&errs, key, v, "address ranges") {
				if p, ok := parseRoutePrefix(&errs, fmt.Sprintf("%s[%d]", key, i), t); ok {
					r.CIDR = append(r.CIDR, prefixEntry{Prefix: p, Pos: t.Pos})
				}
			}
		case "port":
			for i, t := range decodeScalarOrList(&errs, key, v, "ports") {
				if pr, ok := parsePortRange(&errs, fmt.Sprintf("%s[%d]", key, i), t); ok {
					r.Port = append(r.Port, pr)
				}
			}
		case "destination":
			r.Destination = decodeText(&errs, key, v)
		case "access_point":
			r.AccessPoint = decodeText(&errs, key, v)
		case "reject":
			if v.Kind != yaml.ScalarNode || v.Tag != "!!bool" || v.Value != "true" {
				errs.add(posOf(v), key, "must be true, found %s; leave reject out to send the targets to a destination", describe(v))
				return
			}
			r.Reject = posOf(v)
		}
	})

	if len(r.DomainSuffix) == 0 && len(r.Domain) == 0 && len(r.CIDR) == 0 && len(r.Port) == 0 &&
		!hasError(errs, "domain_suffix") && !hasError(errs, "domain") && !hasError(errs, "cidr") && !hasError(errs, "port") &&
		len(errs) == 0 {
		errs.add(r.pos, "", "missing condition: give at least one of domain_suffix, domain, cidr and port")
	}
	actions := 0
	for _, set := range []bool{r.Destination.IsSet(), r.AccessPoint.IsSet(), r.Reject.IsSet()} {
		if set {
			actions++
		}
	}
	switch {
	case actions > 1:
		errs.add(r.pos, "", "more than one of destination, access_point and reject given, a route needs exactly one")
	case actions == 0 && !hasError(errs, "destination") && !hasError(errs, "access_point") && !hasError(errs, "reject"):
		errs.add(r.pos, "", "missing destination, access_point or reject")
	}
	return errs.err()
}

// decodeScalarOrList decodes one scalar or a list of scalars, so that a
// route can say "port: 443" as well as "port: [80, 443]".
func decodeScalarOrList(errs *ErrorList, path string, n *yaml.Node, items string) []text {
	n = resolve(n)
	if n.Kind == yaml.ScalarNode {
		return []text{decodeText(errs, path, n)}
	}
	list := decodeTextList(errs, path, n, items)
	if n.Kind == yaml.SequenceNode && len(n.Content) == 0 {
		errs.add(posOf(n), path, "empty list; leave %s out instead", path)
	}
	var set []text
	for _, t := range list {
		if t.IsSet() {
			set = append(set, t)
		}
	}
	return set
}

// parseRouteDomain checks a domain or domain_suffix entry and returns it
// in lower case without a trailing dot.
func parseRouteDomain(errs *ErrorList, path string, t text) (string, bool) {
	if !t.IsSet() {
		return "", false
	}
	if strings.HasPrefix(t.Value, "*.") || strings.HasPrefix(t.Value, ".") {
		errs.add(t.Pos, path, "invalid domain name %q: write it without a leading \"*.\" or \".\", because a domain_suffix covers its subdomains already", t.Value)
		return "", false
	}
	name := strings.TrimSuffix(t.Value, ".")
	if msg := checkDomainName(name); msg != "" {
		errs.add(t.Pos, path, "invalid domain name %q: %s", t.Value, msg)
		return "", false
	}
	return strings.ToLower(name), true
}

// parseRoutePrefix parses an address range or a single address. A range
// with bits set after its length is refused, because it is usually a typo
// for a different range.
func parseRoutePrefix(errs *ErrorList, path string, t text) (netip.Prefix, bool) {
	if addr, err := netip.ParseAddr(t.Value); err == nil && addr.Zone() == "" {
		addr = addr.Unmap()
		return netip.PrefixFrom(addr, addr.BitLen()), true
	}
	p, err := netip.ParsePrefix(t.Value)
	if err != nil {
		errs.add(t.Pos, path, "invalid address range %q: want an address or address/length, like 198.51.100.0/24 or 2001:db8::/32", t.Value)
		return netip.Prefix{}, false
	}
	if p.Masked() != p {
		errs.add(t.Pos, path, "invalid address range %q: bits are set after the first %d; did you mean %s?", t.Value, p.Bits(), p.Masked())
		return netip.Prefix{}, false
	}
	if p.Addr().Is4In6() {
		if p.Bits() < 96 {
			errs.add(t.Pos, path, "invalid address range %q: write IPv4 ranges in IPv4 form", t.Value)
			return netip.Prefix{}, false
		}
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	return p, true
}

// parsePortRange parses "443" or "8000-8999".
func parsePortRange(errs *ErrorList, path string, t text) (PortRange, bool) {
	first, last, isRange := strings.Cut(t.Value, "-")
	a, errA := strconv.ParseUint(strings.TrimSpace(first), 10, 16)
	b := a
	var errB error
	if isRange {
		b, errB = strconv.ParseUint(strings.TrimSpace(last), 10, 16)
	}
	switch {
	case errA != nil || errB != nil || a == 0 || b == 0:
		errs.add(t.Pos, path, "invalid port %q: want a port from 1 to 65535 or a range like \"8000-8999\"", t.Value)
		return PortRange{}, false
	case a > b:
		errs.add(t.Pos, path, "invalid port range %q: the first port is above the last", t.Value)
		return PortRange{}, false
	}
	return PortRange{First: uint16(a), Last: uint16(b)}, true
}

// parseDNSListen parses an app's dns_listen address, which must be a
// loopback address: answering other hosts would hand them this app's view
// of the networks, intranet names included.
func parseDNSListen(errs *ErrorList, path string, t text) (netip.AddrPort, bool) {
	host, portText, err := net.SplitHostPort(t.Value)
	port, perr := strconv.ParseUint(portText, 10, 16)
	if err != nil || perr != nil || port == 0 {
		errs.add(t.Pos, path, "invalid DNS listen address %q: want a loopback address and a port from 1 to 65535, like 127.0.0.1:5353", t.Value)
		return netip.AddrPort{}, false
	}
	if host == "localhost" {
		host = "127.0.0.1"
	}
	addr, err := netip.ParseAddr(host)
	if err != nil || !addr.Unmap().IsLoopback() || addr.Zone() != "" {
		errs.add(t.Pos, path, "invalid DNS listen address %q: the host must be a loopback address, like 127.0.0.1 or ::1, so that only this host can ask", t.Value)
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(addr.Unmap(), uint16(port)), true
}

// rawProxy is an access point's proxy map.
type rawProxy struct {
	// URL (key url, required) is the gateway proxy: socks5://host:port or
	// http://host:port (HTTP CONNECT). host is an IP address, or a name
	// that the access point's own DNS servers resolve. Credentials go in
	// user and password_env, not in the URL.
	URL text
	// User (key user, optional) is the user name sent to the proxy: SOCKS5
	// user name and password (RFC 1929), or HTTP Basic. Needs password_env.
	User text
	// PasswordEnv (key password_env, optional) names the environment
	// variable that holds the password, read once at load. Needs user.
	PasswordEnv text

	protocol ProxyProtocol
	address  string // host:port
	host     string
	hostAddr netip.Addr // invalid when host is a name
	pos      position
}

var proxyKeys = []string{"url", "user", "password_env"}

func (p *rawProxy) UnmarshalYAML(n *yaml.Node) error {
	var errs ErrorList
	p.pos = posOf(n)
	if !expectKind(&errs, "", n, yaml.MappingNode, "a map (keys: "+strings.Join(proxyKeys, ", ")+")") {
		return errs.err()
	}

	eachField(&errs, n, proxyKeys, func(key string, v *yaml.Node) {
		switch key {
		case "url":
			p.URL = decodeText(&errs, key, v)
			if p.URL.IsSet() {
				p.parseURL(&errs, key)
			}
		case "user":
			p.User = decodeText(&errs, key, v)
			if p.User.IsSet() {
				if msg := checkUserName(p.User.Value); msg != "" && !strings.Contains(msg, "'+'") {
					errs.add(p.User.Pos, key, "invalid user name %q: %s", p.User.Value, msg)
				}
			}
		case "password_env":
			p.PasswordEnv = decodeText(&errs, key, v)
			if p.PasswordEnv.IsSet() && !isEnvName(p.PasswordEnv.Value) {
				errs.add(p.PasswordEnv.Pos, key, "invalid environment variable name %q", p.PasswordEnv.Value)
			}
		}
	})

	if !p.URL.IsSet() && !hasError(errs, "url") {
		errs.add(p.pos, "", "missing url (socks5://host:port or http://host:port)")
	}
	switch {
	case p.User.IsSet() && !p.PasswordEnv.IsSet() && !hasError(errs, "password_env"):
		errs.add(p.User.Pos, "user", "user given without password_env")
	case p.PasswordEnv.IsSet() && !p.User.IsSet() && !hasError(errs, "user"):
		errs.add(p.PasswordEnv.Pos, "password_env", "password_env given without user")
	}
	return errs.err()
}

func (p *rawProxy) parseURL(errs *ErrorList, key string) {
	bad := func(why string) {
		errs.add(p.URL.Pos, key, "invalid proxy URL %q: %s", p.URL.Value, why)
	}
	u, err := url.Parse(p.URL.Value)
	if err != nil {
		bad("want socks5://host:port or http://host:port")
		return
	}
	switch u.Scheme {
	case "socks5":
		p.protocol = ProxySOCKS5
	case "http":
		p.protocol = ProxyHTTP
	case "socks5h":
		bad("use socks5://, which passes names to the proxy unresolved as well")
		return
	default:
		bad("the scheme must be socks5 or http")
		return
	}
	switch {
	case u.User != nil:
		bad("put the credentials in user and password_env, not in the URL")
		return
	case (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "":
		bad("want only scheme, host and port")
		return
	case u.Port() == "":
		bad("missing port")
		return
	}
	port, err := strconv.ParseUint(u.Port(), 10, 16)
	if err != nil || port == 0 {
		bad("port must be a number from 1 to 65535")
		return
	}
	p.host = u.Hostname()
	if addr, err := netip.ParseAddr(p.host); err == nil {
		p.hostAddr = addr.Unmap()
	} else if msg := checkDomainName(p.host); msg != "" {
		bad("host must be an IP address or a domain name")
		return
	}
	p.address = net.JoinHostPort(p.host, u.Port())
}
