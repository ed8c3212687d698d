package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"iapd/admin"
	"iapd/dns"
	"iapd/iface"
	"iapd/internal/logkey"
	"iapd/policy"
	"iapd/proxy"
)

// network joins the interface manager, the health of the access points
// and one resolver per access point into the view the proxy dials
// through. A reload replaces the resolvers; those of the previous policy
// stay reachable for dials that started before it, as the manager's
// dialers do.
type network struct {
	links   *iface.Manager
	metrics *admin.Metrics // nil counts nothing
	logger  *slog.Logger
	watcher *dns.Watcher  // of the dns: auto links of the current policy; nil when none
	health  *iface.Health // set by startHealth

	resolvers  atomic.Pointer[resolverSet]
	conditions atomic.Pointer[conditions] // of the current policy; set by startHealth
}

type resolverSet struct {
	cur, prev map[*policy.AccessPoint]*timedResolver
	// probes ask the servers of access points with a dns probe, with the
	// cache turned off, so that a cached answer cannot pass the probe.
	probes map[*policy.AccessPoint]*dns.Resolver
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
		cur[ap] = &timedResolver{ap: ap, r: n.newResolver(ap, 0), metrics: n.metrics}
	}
	probes := make(map[*policy.AccessPoint]*dns.Resolver)
	for _, ap := range pol.AccessPointOrder {
		if ap.Probe != nil && ap.Probe.Kind == policy.ProbeDNS {
			probes[ap] = n.newResolver(ap, -1)
		}
	}
	n.resolvers.Store(&resolverSet{cur: cur, prev: old, probes: probes})

	for _, ap := range pol.AccessPointOrder {
		switch {
		case ap.SystemDNS:
			n.logger.Info("access point DNS", logkey.AccessPoint, ap.Name, "source", "system resolver")
		case ap.AutoDNS:
			// Logged when the watcher finds the servers.
		default:
			n.logger.Info("access point DNS", logkey.AccessPoint, ap.Name, "servers", ap.DNS, "search", ap.Search, "source", "policy")
		}
	}
	if n.watcher != nil {
		n.watcher.Close()
	}
	n.watcher = watchAutoDNS(context.Background(), pol, cur, dns.DiscoverConfig{Logger: n.logger}, n.logger)

	if n.health != nil {
		n.conditions.Store(newConditions(pol, n.health, n.conditions.Load()))
		n.health.Update(pol)
	}
}

// startHealth starts following the access points' health, probes
// included, and the conditions that plans see. The caller closes the
// returned Health.
func (n *network) startHealth(pol *policy.Policy, gatewayDial func(context.Context, *policy.AccessPoint, string) (net.Conn, error), logger *slog.Logger) *iface.Health {
	n.health = iface.NewHealth(iface.HealthConfig{
		GatewayDial: gatewayDial,
		Policy:      pol,
		Manager:     n.links,
		Resolve:     n.lookup,
		Query:       n.query,
		Logger:      logger,
	})
	n.conditions.Store(newConditions(pol, n.health, nil))
	return n.health
}

// lookup resolves host with ap's resolver, for the names in probes.
func (n *network) lookup(ctx context.Context, ap *policy.AccessPoint, host string) ([]netip.Addr, error) {
	return n.Resolver(ap).LookupNetIP(ctx, host)
}

// query resolves host for ap's dns probe, asking its servers.
func (n *network) query(ctx context.Context, ap *policy.AccessPoint, host string) ([]netip.Addr, error) {
	if r, ok := n.resolvers.Load().probes[ap]; ok {
		return r.LookupNetIP(ctx, host)
	}
	return n.Resolver(ap).LookupNetIP(ctx, host)
}

// close stops following the DNS configuration of dns: auto links.
func (n *network) close() {
	if n.watcher != nil {
		n.watcher.Close()
	}
}

// newResolver returns a resolver of ap with cacheSize as dns.Config has
// it: 0 for the default, negative for no cache.
func (n *network) newResolver(ap *policy.AccessPoint, cacheSize int) *dns.Resolver {
	if ap.SystemDNS {
		return dns.System()
	}
	// Every query of this resolver leaves through the access point's own
	// interface, because its sockets come from the bound dialer. A resolver
	// kept across reloads keeps its dialer, which stays valid because the
	// access point keeps its interface, sources and mark.
	dialer := n.links.Dialer(ap)
	return dns.New(dns.Config{
		Name:      ap.Name,
		Servers:   ap.DNS,
		Search:    ap.Search,
		Timeouts:  ap.DNSTimeouts,
		Dial:      dialer.DialContext,
		Logger:    n.logger,
		CacheSize: cacheSize,
	})
}

// sameDNS reports whether a and b resolve alike: the same interface and
// the same DNS settings.
func sameDNS(a, b *policy.AccessPoint) bool {
	return a.Interface == b.Interface &&
		a.SystemDNS == b.SystemDNS &&
		a.AutoDNS == b.AutoDNS &&
		slices.Equal(a.DNS, b.DNS) &&
		slices.Equal(a.Search, b.Search) &&
		slices.Equal(a.DNSTimeouts, b.DNSTimeouts) &&
		slices.Equal(a.Sources, b.Sources) &&
		slices.Equal(a.Gateways, b.Gateways)
}

// Conditions returns what plans see of the access points now.
func (n *network) Conditions() policy.Conditions { return n.conditions.Load() }

// ReportDial passes the outcome of a dial to the access point's health. A
// failure that points at the access point counts against it. Anything that
// shows that the way out works clears the count: a connection, a refusal
// by the target, a name that does not exist.
func (n *network) ReportDial(ap *policy.AccessPoint, err error) {
	if isAccessPointFailure(err) {
		n.health.DialFailed(ap, err)
		return
	}
	n.health.DialSucceeded(ap)
}

// isAccessPointFailure reports whether a dial error shows that the access
// point, rather than the target, could not carry the connection: a
// timeout, no route, or DNS servers that did not answer.
func isAccessPointFailure(err error) bool {
	var ne net.Error
	switch {
	case err == nil:
		return false
	case errors.Is(err, dns.ErrNoAnswer),
		errors.Is(err, syscall.ENETUNREACH),
		errors.Is(err, syscall.EHOSTUNREACH),
		errors.Is(err, context.DeadlineExceeded),
		errors.Is(err, os.ErrDeadlineExceeded):
		return true
	case errors.As(err, &ne) && ne.Timeout():
		return true
	}
	return false
}

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

// autoInterfaces returns the interfaces of the access points with dns:
// auto, once each.
func autoInterfaces(pol *policy.Policy) []string {
	var names []string
	for _, ap := range pol.AccessPointOrder {
		if ap.AutoDNS && !slices.Contains(names, ap.Interface) {
			names = append(names, ap.Interface)
		}
	}
	return names
}

// applyLinkDNS gives the resolvers of the dns: auto access points on l's
// interface the servers found for it. Search domains from the policy take
// the place of those found.
func applyLinkDNS(pol *policy.Policy, resolvers map[*policy.AccessPoint]*timedResolver, l dns.LinkDNS, logger *slog.Logger) {
	for _, ap := range pol.AccessPointOrder {
		if !ap.AutoDNS || ap.Interface != l.Interface {
			continue
		}
		search := l.Search
		if len(ap.Search) > 0 {
			search = ap.Search
		}
		if resolvers[ap].r.SetServers(l.Servers, search) {
			logger.Info("access point DNS", logkey.AccessPoint, ap.Name, logkey.Interface, l.Interface,
				"servers", l.Servers, "search", search, "source", l.Source, "detail", l.Detail)
		}
	}
}

// watchAutoDNS follows the system's DNS configuration of the interfaces of
// dns: auto access points, or returns nil when there are none.
func watchAutoDNS(ctx context.Context, pol *policy.Policy, resolvers map[*policy.AccessPoint]*timedResolver, cfg dns.DiscoverConfig, logger *slog.Logger) *dns.Watcher {
	names := autoInterfaces(pol)
	if len(names) == 0 {
		return nil
	}
	return dns.NewWatcher(ctx, dns.WatcherConfig{
		DiscoverConfig: cfg,
		Interfaces:     names,
		OnChange:       func(l dns.LinkDNS) { applyLinkDNS(pol, resolvers, l, logger) },
	})
}

// resolveRoute returns, for the DNS listener of app, the resolvers that
// may answer for key (a name, or the address of a reverse lookup): those
// of the usable access points of the destination that app's routes choose.
func (n *network) resolveRoute(app *policy.App, key string) ([]*dns.Resolver, []string, error) {
	plan := policy.NewResolvePlan(app, key, n.Conditions())
	if err := plan.Refused(); err != nil {
		return nil, nil, fmt.Errorf("%w: %w", dns.ErrRefused, err)
	}
	if err := plan.Err(); err != nil {
		return nil, nil, err
	}
	set := n.resolvers.Load()
	var resolvers []*dns.Resolver
	var names []string
	for _, ap := range plan.Candidates {
		r, ok := set.cur[ap]
		if !ok {
			r, ok = set.prev[ap]
		}
		if ok {
			resolvers = append(resolvers, r.r)
			names = append(names, ap.Name)
		}
	}
	return resolvers, names, nil
}

// dnsListenerConfig returns the configuration of the DNS listener of app,
// which answers with app's routes. A reload passes a kept listener the
// new policy's app with dns.Listener.Update.
func (n *network) dnsListenerConfig(app *policy.App) dns.ListenerConfig {
	return dns.ListenerConfig{
		App:    app.Name,
		Route:  func(key string) ([]*dns.Resolver, []string, error) { return n.resolveRoute(app, key) },
		Logger: n.logger,
	}
}

// conditions is the daemon's policy.Conditions for one policy: the health
// of the access points, the clock, what each destination prefers now (kept
// by the supervisor) and the round-robin counters. It is safe for
// concurrent use.
type conditions struct {
	health interface {
		Status(*policy.AccessPoint) policy.Status
	}
	turns map[*policy.Destination]*atomic.Uint64 // one per destination, made at start

	mu      sync.Mutex // protects current
	current map[*policy.Destination]*policy.AccessPoint
}

// newConditions returns the conditions of pol. What the destinations of
// prev preferred carries over, by name, to those of pol.
func newConditions(pol *policy.Policy, health interface {
	Status(*policy.AccessPoint) policy.Status
}, prev *conditions) *conditions {
	c := &conditions{
		health:  health,
		turns:   make(map[*policy.Destination]*atomic.Uint64, len(pol.Destinations)),
		current: make(map[*policy.Destination]*policy.AccessPoint),
	}
	for _, d := range pol.Destinations {
		c.turns[d] = new(atomic.Uint64)
	}
	if prev == nil {
		return c
	}
	prev.mu.Lock()
	defer prev.mu.Unlock()
	for d, ap := range prev.current {
		nd, ok := pol.Destinations[d.Name]
		if !ok || ap == nil {
			continue
		}
		if nap, ok := pol.AccessPoints[ap.Name]; ok && slices.Contains(nd.AccessPoints, nap) {
			c.current[nd] = nap
		}
	}
	return c
}

func (c *conditions) Status(ap *policy.AccessPoint) policy.Status { return c.health.Status(ap) }

func (c *conditions) Now() time.Time { return time.Now() }

func (c *conditions) Current(d *policy.Destination) *policy.AccessPoint {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.current[d]
}

func (c *conditions) setCurrent(d *policy.Destination, ap *policy.AccessPoint) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.current[d] = ap
}

func (c *conditions) Turn(d *policy.Destination) uint64 {
	t, ok := c.turns[d]
	if !ok {
		return 0
	}
	return t.Add(1) - 1
}
