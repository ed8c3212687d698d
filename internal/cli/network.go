package cli

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	"iapd/admin"
	"iapd/dns"
	"iapd/iface"
	"iapd/policy"
	"iapd/proxy"
)

// network joins the interface manager and one resolver per access point
// into the view the proxy dials through. A reload replaces the resolvers;
// those of the previous policy stay reachable for dials that started
// before it, as the manager's dialers do.
type network struct {
	links   *iface.Manager
	metrics *admin.Metrics // nil counts nothing
	logger  *slog.Logger

	resolvers atomic.Pointer[resolverSet]
}

type resolverSet struct {
	cur, prev map[*policy.AccessPoint]*timedResolver
}

func newNetwork(pol *policy.Policy, links *iface.Manager, metrics *admin.Metrics, logger *slog.Logger) *network {
	n := &network{links: links, metrics: metrics, logger: logger}
	n.resolvers.Store(&resolverSet{})
	n.update(pol)
	return n
}

// update builds the resolvers of pol. An access point whose DNS settings
// and interface did not change keeps its resolver, and with it its cache.
func (n *network) update(pol *policy.Policy) {
	old := n.resolvers.Load().cur
	byName := make(map[string]*timedResolver, len(old))
	for _, r := range old {
		byName[r.ap.Name] = r
	}

	cur := make(map[*policy.AccessPoint]*timedResolver, len(pol.AccessPointOrder))
	for _, ap := range pol.AccessPointOrder {
		if r, ok := byName[ap.Name]; ok && sameDNS(r.ap, ap) {
			cur[ap] = &timedResolver{ap: ap, r: r.r, metrics: n.metrics}
			continue
		}
		cur[ap] = &timedResolver{ap: ap, r: n.newResolver(ap), metrics: n.metrics}
	}
	n.resolvers.Store(&resolverSet{cur: cur, prev: old})
}

func (n *network) newResolver(ap *policy.AccessPoint) *dns.Resolver {
	if ap.SystemDNS {
		return dns.System()
	}
	// Every query of this resolver leaves through the access point's own
	// interface, because its sockets come from the bound dialer. A resolver
	// kept across reloads keeps its dialer, which stays valid because the
	// access point keeps its interface, sources and mark.
	dialer := n.links.Dialer(ap)
	return dns.New(dns.Config{
		Name:     ap.Name,
		Servers:  ap.DNS,
		Search:   ap.Search,
		Timeouts: ap.DNSTimeouts,
		Dial:     dialer.DialContext,
		Logger:   n.logger,
	})
}

// sameDNS reports whether a and b resolve alike: the same interface and
// the same DNS settings.
func sameDNS(a, b *policy.AccessPoint) bool {
	return a.Interface == b.Interface &&
		a.SystemDNS == b.SystemDNS &&
		slices.Equal(a.DNS, b.DNS) &&
		slices.Equal(a.Search, b.Search) &&
		slices.Equal(a.DNSTimeouts, b.DNSTimeouts) &&
		slices.Equal(a.Sources, b.Sources) &&
		slices.Equal(a.Gateways, b.Gateways)
}

func (n *network) Usability() policy.Usability { return n.links.Snapshot() }

func (n *network) Dialer(ap *policy.AccessPoint) proxy.Dialer { return n.links.Dialer(ap) }

func (n *network) Resolver(ap *policy.AccessPoint) proxy.Resolver {
	set := n.resolvers.Load()
	if r, ok := set.cur[ap]; ok {
		return r
	}
	if r, ok := set.prev[ap]; ok {
		return r
	}
	// Only access points of the last two policies reach the proxy.
	panic("cli: network.Resolver: access point " + ap.Name + " of no known policy")
}

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

// timedResolver counts the lookups of one access point's resolver and
// their time in the metrics.
type timedResolver struct {
	ap      *policy.AccessPoint
	r       *dns.Resolver
	metrics *admin.Metrics
}

func (t *timedResolver) LookupNetIP(ctx context.Context, host string) ([]netip.Addr, error) {
	started := time.Now()
	addrs, err := t.r.LookupNetIP(ctx, host)
	if t.metrics != nil {
		t.metrics.DNSLookup(t.ap.Name, time.Since(started), err)
	}
	return addrs, err
}
