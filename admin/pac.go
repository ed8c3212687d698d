package admin

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"

	"iapd/policy"
)

// pacRule is one rule of the PAC file as its JavaScript reads it.
type pacRule struct {
	Patterns []string `json:"patterns"` // "*", shell patterns and exact host names, lower case
	Prefixes []string `json:"prefixes"` // IP prefixes, matched against address literals
	Proxy    string   `json:"proxy"`    // the PAC result: "SOCKS5 host:port", "PROXY host:port" or "DIRECT"
}

// pacScript is the PAC file. It resolves no name (no dnsResolve, no
// isInNet on a name), so the browser's own resolver never learns which
// hosts go through iapd. Prefixes match only address literals, which the
// helper functions parse themselves.
const pacScript = `// PAC file of iapd, made from the policy %s (sha256 %s).
// The first rule that matches the host wins; a host that none matches
// goes DIRECT.
var iapdRules = %s;

function FindProxyForURL(url, host) {
  host = host.toLowerCase();
  if (host.charAt(0) == "[") {
    host = host.substring(1, host.length - 1);
  }
  for (var i = 0; i < iapdRules.length; i++) {
    if (iapdMatches(iapdRules[i], host)) {
      return iapdRules[i].proxy;
    }
  }
  return "DIRECT";
}

function iapdMatches(rule, host) {
  for (var i = 0; i < rule.patterns.length; i++) {
    var p = rule.patterns[i];
    if (p == host || (/[*?]/.test(p) && shExpMatch(host, p))) {
      return true;
    }
  }
  var addr = iapdParseAddress(host);
  if (addr === null) {
    return false;
  }
  for (var j = 0; j < rule.prefixes.length; j++) {
    var parts = rule.prefixes[j].split("/");
    var net = iapdParseAddress(parts[0]);
    if (net !== null && net.length == addr.length && iapdPrefixMatches(addr, net, parseInt(parts[1], 10))) {
      return true;
    }
  }
  return false;
}

// iapdParseAddress returns an IPv4 address as 4 bytes or an IPv6 address
// as 16, or null when s is not an address literal.
function iapdParseAddress(s) {
  if (/^\d{1,3}(\.\d{1,3}){3}$/.test(s)) {
    var bytes = s.split(".");
    for (var i = 0; i < 4; i++) {
      bytes[i] = parseInt(bytes[i], 10);
      if (bytes[i] > 255) {
        return null;
      }
    }
    return bytes;
  }
  if (s.indexOf(":") < 0 || !/^[0-9a-f:.]+$/.test(s)) {
    return null;
  }
  var halves = s.split("::");
  if (halves.length > 2) {
    return null;
  }
  var head = halves[0] ? halves[0].split(":") : [];
  var tail = halves.length == 2 && halves[1] ? halves[1].split(":") : [];
  var groups = head.concat(tail);
  var last = groups[groups.length - 1];
  var v4 = null;
  if (last && last.indexOf(".") >= 0) {
    v4 = iapdParseAddress(last);
    if (v4 === null) {
      return null;
    }
    groups.pop();
    if (halves.length == 2 && tail.length > 0) {
      tail.pop();
    } else {
      head.pop();
    }
  }
  var want = v4 === null ? 8 : 6;
  var fill = want - head.length - tail.length;
  if ((halves.length == 1 && fill != 0) || fill < 0) {
    return null;
  }
  var all = head;
  for (var k = 0; k < fill; k++) {
    all = all.concat(["0"]);
  }
  all = all.concat(tail);
  var out = [];
  for (var g = 0; g < all.length; g++) {
    if (!/^[0-9a-f]{1,4}$/.test(all[g])) {
      return null;
    }
    var n = parseInt(all[g], 16);
    out.push(n >> 8, n & 255);
  }
  return v4 === null ? out : out.concat(v4);
}

function iapdPrefixMatches(addr, net, bits) {
  for (var i = 0; i < addr.length && bits > 0; i++, bits -= 8) {
    var mask = bits >= 8 ? 255 : (255 << (8 - bits)) & 255;
    if ((addr[i] & mask) != (net[i] & mask)) {
      return false;
    }
  }
  return true;
}
`

// PAC returns the PAC file of p. addrOf gives the address each listener
// accepts on; an unspecified host (0.0.0.0, ::) becomes 127.0.0.1, the
// address a browser on this host reaches it on.
func PAC(p *policy.Policy, addrOf func(*policy.Listener) string) string {
	rules := []pacRule{}
	for _, r := range p.Control.PAC {
		rule := pacRule{Patterns: []string{}, Prefixes: []string{}, Proxy: "DIRECT"}
		for _, h := range r.Hosts {
			if strings.Contains(h, "/") {
				rule.Prefixes = append(rule.Prefixes, netip.MustParsePrefix(h).Masked().String())
				continue
			}
			rule.Patterns = append(rule.Patterns, strings.ToLower(h))
		}
		if !r.Direct && r.Listener != nil {
			rule.Proxy = pacProxy(r.Listener, addrOf(r.Listener))
		}
		rules = append(rules, rule)
	}
	data, _ := json.MarshalIndent(rules, "", "  ")
	return fmt.Sprintf(pacScript, p.Path, p.Hash, data)
}

// pacProxy returns the PAC result that sends a browser to listener l at
// addr: SOCKS5 for a SOCKS5 listener, PROXY for an HTTP or mixed one.
func pacProxy(l *policy.Listener, addr string) string {
	if addr == "" {
		addr = l.Listen
	}
	if ap, err := netip.ParseAddrPort(addr); err == nil && ap.Addr().IsUnspecified() {
		addr = net.JoinHostPort("127.0.0.1", fmt.Sprint(ap.Port()))
	}
	if l.Protocol == policy.ProtocolSOCKS5 {
		return "SOCKS5 " + addr
	}
	return "PROXY " + addr
}

func (s *Server) handlePAC(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/x-ns-proxy-autoconfig")
	w.Header().Set("Cache-Control", "no-store")
	fmt.Fprint(w, PAC(s.cfg.Daemon.Policy(), s.cfg.Daemon.ListenerAddr))
}
