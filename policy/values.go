package policy

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// This file contains the syntax checks of single values in the raw schema:
// addresses, names and protocols.

// parseListen parses a listen address. "localhost" becomes 127.0.0.1,
// which is the address Go's net.Listen picks for it.
func parseListen(errs *ErrorList, path string, t text) (netip.Addr, uint16, bool) {
	host, portText, err := net.SplitHostPort(t.Value)
	if err != nil {
		errs.add(t.Pos, path, "invalid listen address %q: want host:port, like 127.0.0.1:1080", t.Value)
		return netip.Addr{}, 0, false
	}
	port, err := strconv.ParseUint(portText, 10, 16)
	if err != nil {
		errs.add(t.Pos, path, "invalid listen address %q: port must be a number from 0 to 65535", t.Value)
		return netip.Addr{}, 0, false
	}

	var addr netip.Addr
	switch host {
	case "":
	case "localhost":
		addr = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	default:
		addr, err = netip.ParseAddr(host)
		if err != nil {
			errs.add(t.Pos, path, "invalid listen address %q: host must be an IP address, \"localhost\" or empty", t.Value)
			return netip.Addr{}, 0, false
		}
		addr = addr.Unmap()
	}
	return addr, uint16(port), true
}

func parseProtocol(errs *ErrorList, path string, t text) Protocol {
	for _, p := range []Protocol{ProtocolSOCKS5, ProtocolHTTP, ProtocolMixed} {
		if t.Value == p.String() {
			return p
		}
	}
	errs.add(t.Pos, path, "invalid protocol %q: must be socks5, http or mixed", t.Value)
	return ProtocolMixed
}

// isEnvName reports whether name can name an environment variable, which
// rules out an empty name and one with '=' or NUL.
func isEnvName(name string) bool {
	return name != "" && !strings.ContainsAny(name, "=\x00")
}

// checkUserName returns why name cannot be a user name, or "".
func checkUserName(name string) string {
	switch {
	case name == "":
		return "must not be empty"
	case len(name) > 255:
		return "longer than 255 bytes, which SOCKS5 cannot send"
	case strings.Contains(name, ":"):
		return "must not contain ':', because HTTP Basic authentication splits at the first colon"
	case strings.Contains(name, "+"):
		return "must not contain '+', which is reserved for choosing an access point per connection"
	}
	for _, r := range name {
		if r <= ' ' || r == 0x7f {
			return "must not contain spaces or control characters"
		}
	}
	return ""
}

// checkInterfaceName returns why name cannot be a Linux interface name, or
// "". The rules are those of dev_valid_name in the kernel's
// net/core/dev.c; IFNAMSIZ is 16 bytes with the terminating NUL.
func checkInterfaceName(name string) string {
	switch {
	case name == "":
		return "must not be empty"
	case len(name) > 15:
		return "longer than 15 bytes, the kernel's limit"
	case name == "." || name == "..":
		return "must not be \".\" or \"..\""
	}
	for _, r := range name {
		if r == '/' || r == ':' || r <= ' ' || r == 0x7f {
			return "must not contain '/', ':', whitespace or control characters"
		}
	}
	return ""
}

// checkDomainName returns why name (without its trailing dot) cannot be a
// DNS search domain, or "". Labels are 1 to 63 letters, digits, '-' or
// '_', not starting or ending with '-'; the name is at most 253 bytes.
func checkDomainName(name string) string {
	if name == "" {
		return "must not be empty or the root"
	}
	if len(name) > 253 {
		return "longer than 253 bytes"
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" {
			return "empty label"
		}
		if len(label) > 63 {
			return "label longer than 63 bytes"
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return "label starts or ends with '-'"
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return "use only letters, digits, '-' and '_' in labels"
			}
		}
	}
	return ""
}

// parseDNSServer parses entry i of a dns list, "addr" or "addr:port"
// ("[v6]:port" for IPv6).
func parseDNSServer(errs *ErrorList, key string, i int, t text) (dnsServer, bool) {
	path := fmt.Sprintf("%s[%d]", key, i)
	var ap netip.AddrPort
	if addr, err := netip.ParseAddr(t.Value); err == nil {
		ap = netip.AddrPortFrom(addr, 53)
	} else if ap, err = netip.ParseAddrPort(t.Value); err != nil {
		errs.add(t.Pos, path, "invalid DNS server %q: want an IP address, optionally with a port (192.0.2.53:53, [2001:db8::53]:53)", t.Value)
		return dnsServer{}, false
	}

	addr := ap.Addr()
	switch {
	case ap.Port() == 0:
		errs.add(t.Pos, path, "invalid DNS server %q: port 0", t.Value)
		return dnsServer{}, false
	case addr.IsUnspecified() || addr.IsMulticast():
		errs.add(t.Pos, path, "invalid DNS server %q: not a unicast address", t.Value)
		return dnsServer{}, false
	}
	return dnsServer{Addr: ap, Text: t.Value, Index: i, Pos: t.Pos}, true
}

// decodeAddressList decodes a list of IP addresses without zones.
func decodeAddressList(errs *ErrorList, path string, n *yaml.Node) []address {
	var list []address
	for i, t := range decodeTextList(errs, path, n, "IP addresses") {
		if !t.IsSet() {
			continue
		}
		itemPath := fmt.Sprintf("%s[%d]", path, i)
		addr, err := netip.ParseAddr(t.Value)
		switch {
		case err != nil:
			errs.add(t.Pos, itemPath, "invalid IP address %q", t.Value)
		case addr.Zone() != "":
			errs.add(t.Pos, itemPath, "invalid IP address %q: leave out the zone, the access point's interface sets it", t.Value)
		case addr.IsUnspecified() || addr.IsMulticast() || addr.IsLoopback():
			errs.add(t.Pos, itemPath, "invalid IP address %q: must be a unicast address of a network, not unspecified, multicast or loopback", t.Value)
		default:
			list = append(list, address{Addr: addr.Unmap(), Index: i, Pos: t.Pos})
		}
	}
	return list
}

// decodePrefixList decodes a list of address prefixes. A single address
// stands for itself alone (/32 or /128). Host bits past the prefix length
// are an error, as they usually mean a mistyped length.
func decodePrefixList(errs *ErrorList, path string, n *yaml.Node) []prefix {
	var list []prefix
	for i, t := range decodeTextList(errs, path, n, "address prefixes") {
		if !t.IsSet() {
			continue
		}
		itemPath := fmt.Sprintf("%s[%d]", path, i)
		if strings.Contains(t.Value, "%") {
			errs.add(t.Pos, itemPath, "invalid address prefix %q: leave out the zone", t.Value)
			continue
		}
		var p netip.Prefix
		if addr, err := netip.ParseAddr(t.Value); err == nil {
			p = netip.PrefixFrom(addr, addr.BitLen())
		} else if p, err = netip.ParsePrefix(t.Value); err != nil {
			errs.add(t.Pos, itemPath, "invalid address prefix %q: want an address or address/length, like 192.0.2.0/24 or 2001:db8::/32", t.Value)
			continue
		}
		if p.Addr().Is4In6() {
			p = netip.PrefixFrom(p.Addr().Unmap(), max(p.Bits()-96, 0))
		}
		if masked := p.Masked(); masked != p {
			errs.add(t.Pos, itemPath, "address prefix %q has bits set past its length; did you mean %s?", t.Value, masked)
			continue
		}
		list = append(list, prefix{Prefix: p, Pos: t.Pos})
	}
	return list
}
