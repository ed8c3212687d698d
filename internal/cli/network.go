package cli

import (
	"log/slog"

	"iapd/dns"
	"iapd/iface"
	"iapd/policy"
	"iapd/proxy"
)

// network joins the interface manager and one resolver per access point
// into the view the proxy dials through.
type network struct {
	links     *iface.Manager
	resolvers map[*policy.AccessPoint]*dns.Resolver
}

func newNetwork(pol *policy.Policy, links *iface.Manager, logger *slog.Logger) *network {
	n := &network{links: links, resolvers: make(map[*policy.AccessPoint]*dns.Resolver)}
	for _, ap := range pol.AccessPointOrder {
		if ap.SystemDNS {
			n.resolvers[ap] = dns.System()
			continue
		}
		// Every query of this resolver leaves through the access point's
		// own interface, because its sockets come from the bound dialer.
		n.resolvers[ap] = dns.New(dns.Config{
			Name:     ap.Name,
			Servers:  ap.DNS,
			Search:   ap.Search,
			Timeouts: ap.DNSTimeouts,
			Dial:     links.Dialer(ap).DialContext,
			Logger:   logger,
		})
	}
	return n
}

func (n *network) Usability() policy.Usability { return n.links.Snapshot() }

func (n *network) Dialer(ap *policy.AccessPoint) proxy.Dialer { return n.links.Dialer(ap) }

func (n *network) Resolver(ap *policy.AccessPoint) proxy.Resolver { return n.resolvers[ap] }

// Interface returns the name of the interface ap sends through now; for
// interface: default that is whichever interface holds the default route.
func (n *network) Interface(ap *policy.AccessPoint) string {
	if !ap.IsDefault() {
		return ap.Interface
	}
	if ifc, _, ok := n.links.Snapshot().Default(false); ok {
		return ifc.Name
	}
	if ifc, _, ok := n.links.Snapshot().Default(true); ok {
		return ifc.Name
	}
	return policy.DefaultInterface
}
