package iface

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"iapd/internal/logkey"
	"iapd/policy"
)

// Kernel entry points, variables so that tests can redirect them.
var (
	capget     = unix.Capget
	procSysNet = "/proc/sys/net" // rp_filter settings live under ipv4/conf/IF/
)

// leftoverSpan is how many marks and tables past the first ones count as
// iapd's when removing what a crashed run left behind. It covers policies
// with up to that many access points.
const leftoverSpan = 256

// NewManager checks that iapd may do what the policy's access points need,
// removes routing state left by a crashed run, installs a routing table and
// rules per access point bound to an interface, and keeps them current as
// interfaces change. A policy using only interface: default needs no
// capability and installs nothing.
func NewManager(cfg ManagerConfig) (*Manager, error) {
	if cfg.Policy == nil {
		panic("iface.NewManager: nil Policy")
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	p := cfg.Policy
	slots := assignSlots(p, nil)

	bound := boundAccessPoints(p)
	if err := checkCapabilities(p, bound, slots); err != nil {
		return nil, err
	}
	if len(bound) > 0 && p.Routing.Mark == 0 {
		return nil, fmt.Errorf("iface: routing mark 0 means unmarked and cannot select a table: set routing.mark in the policy")
	}

	m := &Manager{monitor: cfg.Monitor, logger: logger, routing: p.Routing, slots: slots}
	if m.monitor == nil {
		mon, err := NewMonitor(logger)
		if err != nil {
			return nil, fmt.Errorf("starting interface monitor: %w", err)
		}
		m.monitor, m.ownMonitor = mon, true
	}
	m.dialers.Store(&dialerSet{cur: newDialers(p, slots, m.monitor, m.RoutesReady)})
	if len(bound) == 0 {
		return m, nil
	}

	k, err := newTableKeeper(p, bound, slots, logger)
	if err != nil {
		if m.ownMonitor {
			m.monitor.Close()
		}
		return nil, err
	}
	if err := k.removeLeftovers(); err != nil {
		k.removeAll()
		if m.ownMonitor {
			m.monitor.Close()
		}
		return nil, err
	}
	m.routes = k
	m.unregisterHook = m.monitor.registerReadHook(k.reconcile)
	k.reconcile(m.monitor.Snapshot())
	return m, nil
}

// Update switches the manager to p, a reloaded policy: access points that
// keep their name keep their routing table and mark, new ones get tables
// and rules, and the tables and rules of removed ones are deleted. It
// checks first and changes nothing when p needs a capability iapd lacks,
// changes the routing numbers, or numbers a table or mark out of range;
// the error then says why.
func (m *Manager) Update(p *policy.Policy) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errors.New("iface: manager closed")
	}
	if p.Routing != m.routing {
		return fmt.Errorf("routing numbers changed (table %d, mark %#x, priority %d before; table %d, mark %#x, priority %d now): restart iapd to apply them",
			m.routing.Table, m.routing.Mark, m.routing.RulePriority, p.Routing.Table, p.Routing.Mark, p.Routing.RulePriority)
	}
	slots := assignSlots(p, m.slots)
	if err := checkSlots(p, slots); err != nil {
		return err
	}
	bound := boundAccessPoints(p)
	if err := checkCapabilities(p, bound, slots); err != nil {
		return err
	}

	if m.routes == nil && len(bound) > 0 {
		k, err := newTableKeeper(p, bound, slots, m.logger)
		if err != nil {
			return err
		}
		m.routes = k
		m.unregisterHook = m.monitor.registerReadHook(k.reconcile)
	}
	m.slots = slots
	m.dialers.Store(&dialerSet{cur: newDialers(p, slots, m.monitor, m.RoutesReady), prev: m.dialers.Load().cur})
	if m.routes != nil {
		m.routes.update(bound, slots, m.monitor.Snapshot())
	}
	return nil
}

// checkSlots checks that the tables and marks that slots give stay valid.
// The policy's own validation covers one offset per access point in file
// order; offsets kept across reloads can go past that.
func checkSlots(p *policy.Policy, slots map[string]int) error {
	for _, ap := range p.AccessPointOrder {
		if ap.IsDefault() {
			continue
		}
		table := int64(p.Routing.Table) + int64(slots[ap.Name])
		mark := int64(p.Routing.Mark) + int64(slots[ap.Name])
		switch {
		case table >= unix.RT_TABLE_DEFAULT && table <= unix.RT_TABLE_LOCAL, table > 1<<31-1:
			return fmt.Errorf("access point %q would use routing table %d, which the kernel reserves or does not have: restart iapd to number the tables afresh", ap.Name, table)
		case mark > 1<<32-1:
			return fmt.Errorf("access point %q would use firewall mark %#x, which does not fit 32 bits: restart iapd to number the marks afresh", ap.Name, mark)
		}
	}
	return nil
}

func boundAccessPoints(p *policy.Policy) []*policy.AccessPoint {
	var bound []*policy.AccessPoint
	for _, ap := range p.AccessPointOrder {
		if !ap.IsDefault() {
			bound = append(bound, ap)
		}
	}
	return bound
}

// capabilityError names the capability an access point lacks. It wraps
// ErrMissingCapability.
type capabilityError struct {
	capability string
	ap         *policy.AccessPoint
	purpose    string
}

func (e *capabilityError) Error() string {
	return fmt.Sprintf("iface: access point %q (interface %s) needs %s %s: run iapd as root or grant the capability (systemd: AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW)",
		e.ap.Name, e.ap.Interface, e.capability, e.purpose)
}

func (e *capabilityError) Unwrap() error { return ErrMissingCapability }

// checkCapabilities returns a *capabilityError naming the first bound
// access point when the effective capabilities lack CAP_NET_ADMIN (SO_MARK,
// rules and tables) or CAP_NET_RAW (SO_BINDTODEVICE, see socket(7)).
func checkCapabilities(p *policy.Policy, bound []*policy.AccessPoint, slots map[string]int) error {
	if len(bound) == 0 {
		return nil
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("reading process capabilities: %w", os.NewSyscallError("capget", err))
	}
	has := func(c int) bool { return data[c/32].Effective&(1<<(c%32)) != 0 }

	ap := bound[0]
	if !has(unix.CAP_NET_ADMIN) {
		purpose := fmt.Sprintf("to mark its sockets and install routing table %d", p.Routing.Table+slots[ap.Name])
		return &capabilityError{capability: "CAP_NET_ADMIN", ap: ap, purpose: purpose}
	}
	if !has(unix.CAP_NET_RAW) {
		return &capabilityError{capability: "CAP_NET_RAW", ap: ap, purpose: "to bind its sockets to the interface"}
	}
	return nil
}

// ruleKey identifies one of iapd's rules: "fwmark mark/0xffffffff lookup
// table" at iapd's priority, or "fwmark mark/0xffffffff unreachable" (table
// 0) right after it.
//
// The unreachable rule keeps a marked socket from falling through to the
// main table while the access point's table is empty: after its link went
// down, and between the link coming back and iapd restoring the routes.
// The main table could send it out of another interface. With the rule the
// lookup fails with ENETUNREACH (ip-rule(8), action unreachable). For IPv4
// that is not all: a socket bound to a device takes any failed lookup for
// "target on-link", which is why Dialer also refuses to dial while the
// table is not installed.
type ruleKey struct {
	v6    bool
	mark  uint32
	table int // 0 for the unreachable rule
}

// unreachable reports whether r is the unreachable rule of its mark.
func (r ruleKey) unreachable() bool { return r.table == 0 }

// tableKeeper owns iapd's routing tables and rules. It implements
// routeKeeper.
type tableKeeper struct {
	logger    *slog.Logger
	priority  int
	markBase  uint32
	tableBase int

	mu        sync.Mutex // protects everything below
	span      int        // marks and tables from the bases that count as iapd's
	bound     []*policy.AccessPoint
	slots     map[string]int // access point name to its table and mark offset
	tables    map[int]bool   // the tables of bound
	handle    *netlink.Handle
	closed    bool
	warned    map[string]bool // warnings logged once, cleared when their condition ends
	rpChecked map[string]int  // interface name to the index whose rp_filter was checked
	// ready holds the names of the bound access points whose table held
	// every route it should after the last reconcile, with their rules in
	// place. Names, because a dialer kept across a reload holds the access
	// point of the policy before.
	ready map[string]bool
}

func newTableKeeper(p *policy.Policy, bound []*policy.AccessPoint, slots map[string]int, logger *slog.Logger) (*tableKeeper, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("opening netlink handle: %w", err)
	}
	k := &tableKeeper{
		logger:    logger.With(logkey.Component, "iface.routing"),
		priority:  p.Routing.RulePriority,
		markBase:  p.Routing.Mark,
		tableBase: p.Routing.Table,
		handle:    h,
		warned:    make(map[string]bool),
		rpChecked: make(map[string]int),
		ready:     make(map[string]bool),
	}
	k.setBoundLocked(bound, slots)
	return k, nil
}

// setBoundLocked makes bound the access points whose tables and rules k
// keeps, numbered by slots.
func (k *tableKeeper) setBoundLocked(bound []*policy.AccessPoint, slots map[string]int) {
	k.bound, k.slots = bound, slots
	k.tables = make(map[int]bool, len(bound))
	k.span = leftoverSpan
	for _, ap := range bound {
		k.tables[k.table(ap)] = true
		k.span = max(k.span, slots[ap.Name]+1)
	}
}

func (k *tableKeeper) table(ap *policy.AccessPoint) int { return k.tableBase + k.slots[ap.Name] }
func (k *tableKeeper) mark(ap *policy.AccessPoint) uint32 {
	return k.markBase + uint32(k.slots[ap.Name])
}

// update switches k to a reloaded policy's bound access points. The rules
// of removed access points go with the next rule reconcile, because it
// deletes every rule of iapd's that is not wanted; their routes are deleted
// here, because route reconciling looks only at the tables in use.
func (k *tableKeeper) update(bound []*policy.AccessPoint, slots map[string]int, s *Snapshot) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return
	}
	old := k.tables
	k.setBoundLocked(bound, slots)

	unused := make(map[int]bool)
	for t := range old {
		if !k.tables[t] {
			unused[t] = true
		}
	}
	rulesOK := k.reconcileRulesLocked()
	if len(unused) > 0 {
		routes, err := k.listRoutesLocked(unused)
		if err != nil {
			k.logger.Error("listing routes of removed access points failed", logkey.Err, err)
		}
		for _, r := range routes {
			if err := k.handle.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
				k.logger.Warn("deleting route of a removed access point failed", "route", r.String(), logkey.Err, err)
			}
		}
		k.logger.Info("removed routing tables of removed access points", "tables", len(unused), "routes", len(routes))
	}
	k.setReadyLocked(rulesOK, k.reconcileRoutesLocked(s))
	k.checkReversePathFilterLocked(s)
	k.checkLooseFilterLocked(s)
}

// isOwnRule reports whether r looks like a rule iapd installs: a mark in
// iapd's range, and either a table in iapd's range at iapd's priority or no
// table (the unreachable rule) at the priority after it.
//
// NOTE: this assumes one iapd per network namespace. A second instance with
// the same routing numbers deletes the first one's rules and tables at start.
func (k *tableKeeper) isOwnRule(r netlink.Rule) bool {
	if r.Mark < k.markBase || r.Mark >= k.markBase+uint32(k.span) {
		return false
	}
	switch r.Priority {
	case k.priority:
		return r.Table >= k.tableBase && r.Table < k.tableBase+k.span
	case k.priority + 1:
		return r.Table == 0
	}
	return false
}

// isReady reports whether ap's rules and routes were all in place after
// the last reconcile.
func (k *tableKeeper) isReady(ap *policy.AccessPoint) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.ready[ap.Name]
}

// removeLeftovers deletes the rules and routes of an earlier run that
// ended without cleaning up, so that the first reconcile starts clean.
func (k *tableKeeper) removeLeftovers() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	rules, routes, err := k.flushLocked()
	if err != nil {
		return fmt.Errorf("removing routing state of an earlier run: %w", err)
	}
	if rules+routes > 0 {
		k.logger.Info("removed routing state of an earlier run", "rules", rules, "routes", routes)
	}
	return nil
}

// removeAll deletes all of iapd's rules and routes and stops reconciling.
func (k *tableKeeper) removeAll() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return nil
	}
	k.closed = true
	defer k.handle.Close()
	rules, routes, err := k.flushLocked()
	k.logger.Info("removed routing tables and rules", "rules", rules, "routes", routes)
	if err != nil {
		return fmt.Errorf("removing routing tables and rules: %w", err)
	}
	return nil
}

// flushLocked deletes every rule isOwnRule accepts and every route in the
// tables those rules or the bound access points use. It returns how many
// it deleted.
func (k *tableKeeper) flushLocked() (rules, routes int, err error) {
	installed, err := k.listRulesLocked()
	if err != nil {
		return 0, 0, err
	}
	tables := make(map[int]bool, len(k.tables))
	for t := range k.tables {
		tables[t] = true
	}
	var errs []error
	for _, r := range installed {
		if r.Table != 0 {
			tables[r.Table] = true
		}
		if err := k.handle.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("deleting rule %s: %w", formatRule(r), err))
			continue
		}
		rules++
	}

	present, err := k.listRoutesLocked(tables)
	if err != nil {
		return rules, 0, errors.Join(append(errs, err)...)
	}
	for _, r := range present {
		if err := k.handle.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("deleting route %s: %w", r, err))
			continue
		}
		routes++
	}
	return rules, routes, errors.Join(errs...)
}

// listRulesLocked returns the installed rules that isOwnRule accepts.
func (k *tableKeeper) listRulesLocked() ([]netlink.Rule, error) {
	var own []netlink.Rule
	for _, priority := range []int{k.priority, k.priority + 1} {
		filter := &netlink.Rule{Priority: priority}
		for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			rules, err := k.handle.RuleListFiltered(family, filter, netlink.RT_FILTER_PRIORITY)
			if err != nil {
				return nil, fmt.Errorf("listing rules: %w", err)
			}
			for _, r := range rules {
				if k.isOwnRule(r) {
					own = append(own, r)
				}
			}
		}
	}
	return own, nil
}

// listRoutesLocked returns the routes of both families in tables.
func (k *tableKeeper) listRoutesLocked(tables map[int]bool) ([]netlink.Route, error) {
	var routes []netlink.Route
	filter := &netlink.Route{Table: unix.RT_TABLE_UNSPEC}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		all, err := dump(func() ([]netlink.Route, error) {
			return k.handle.RouteListFiltered(family, filter, netlink.RT_FILTER_TABLE)
		})
		if err != nil {
			return nil, fmt.Errorf("listing routes: %w", err)
		}
		for _, r := range all {
			if tables[r.Table] {
				routes = append(routes, r)
			}
		}
	}
	return routes, nil
}

// reconcile brings the rules and the tables of the bound access points in
// line with s: it adds what is missing and deletes what is stale, in
// iapd's rules and tables only. Failures are logged, and the next change
// retries.
func (k *tableKeeper) reconcile(s *Snapshot) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return
	}
	rulesOK := k.reconcileRulesLocked()
	k.setReadyLocked(rulesOK, k.reconcileRoutesLocked(s))
	k.checkReversePathFilterLocked(s)
	k.checkLooseFilterLocked(s)
}

// setReadyLocked records which bound access points have their rules and
// routes in place: with rulesOK, those that complete holds.
func (k *tableKeeper) setReadyLocked(rulesOK bool, complete map[*policy.AccessPoint]bool) {
	k.ready = make(map[string]bool, len(k.bound))
	for _, ap := range k.bound {
		k.ready[ap.Name] = rulesOK && complete[ap]
	}
}

// reconcileRulesLocked installs the missing rules and deletes stale ones.
// It reports whether every rule is in place.
func (k *tableKeeper) reconcileRulesLocked() bool {
	installed, err := k.listRulesLocked()
	if err != nil {
		k.logger.Error("reconciling rules failed", logkey.Err, err)
		return false
	}

	want := make(map[ruleKey]bool, 4*len(k.bound))
	for _, ap := range k.bound {
		for _, v6 := range []bool{false, true} {
			want[ruleKey{v6: v6, mark: k.mark(ap), table: k.table(ap)}] = true
			want[ruleKey{v6: v6, mark: k.mark(ap)}] = true
		}
	}
	for _, r := range installed {
		key := ruleKey{v6: r.Family == netlink.FAMILY_V6, mark: r.Mark, table: r.Table}
		exact := r.Mask != nil && *r.Mask == 0xffffffff && r.Src == nil && r.Dst == nil &&
			r.IifName == "" && r.OifName == "" && !r.Invert
		if want[key] && exact {
			delete(want, key)
			continue
		}
		if err := k.handle.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			k.logger.Warn("deleting stale rule failed", "rule", formatRule(r), logkey.Err, err)
		}
	}

	complete := true
	for key := range want {
		r := netlink.NewRule()
		r.Family = netlink.FAMILY_V4
		if key.v6 {
			r.Family = netlink.FAMILY_V6
		}
		r.Priority = k.priority
		r.Mark = key.mark
		mask := uint32(0xffffffff)
		r.Mask = &mask
		r.Table = key.table
		if key.unreachable() {
			r.Priority = k.priority + 1
			r.Type = unix.RTN_UNREACHABLE
		}
		if err := k.handle.RuleAdd(r); err != nil && !errors.Is(err, unix.EEXIST) {
			k.logger.Error("adding rule failed", "rule", formatRule(*r), logkey.Err, err)
			complete = false
			continue
		}
		k.logger.Debug("added rule", "rule", formatRule(*r))
	}
	return complete
}

// reconcileRoutesLocked installs the missing routes of the bound access
// points' tables and deletes stale ones. It returns the access points
// whose interface is up and whose table holds every route it should.
func (k *tableKeeper) reconcileRoutesLocked(s *Snapshot) map[*policy.AccessPoint]bool {
	var want []tableRoute
	owner := make(map[tableRoute]*policy.AccessPoint)
	complete := make(map[*policy.AccessPoint]bool, len(k.bound))
	for _, ap := range k.bound {
		ifc, _ := s.Interface(ap.Interface)
		routes, noGateway := desiredRoutes(ap, k.table(ap), ifc)
		want = append(want, routes...)
		for _, r := range routes {
			owner[r] = ap
		}
		complete[ap] = len(routes) > 0
		k.warnNoGatewayLocked(ap, noGateway)
	}

	present, err := k.listRoutesLocked(k.tables)
	if err != nil {
		k.logger.Error("reconciling routing tables failed", logkey.Err, err)
		return nil
	}
	desired := make(map[tableRoute]bool, len(want))
	for _, r := range want {
		desired[r] = true
	}
	installed := make(map[tableRoute]bool, len(present))
	added, deleted := 0, 0

	// Stale routes go first: a default route whose onlink flag changed
	// must be gone before its replacement goes in.
	for _, r := range present {
		key, ok := routeKeyOf(r)
		if ok && desired[key] && !installed[key] {
			installed[key] = true
			continue
		}
		if err := k.handle.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
			k.logger.Warn("deleting stale route failed", "route", r.String(), logkey.Err, err)
			continue
		}
		deleted++
	}
	for _, r := range want {
		if installed[r] {
			continue
		}
		warnKey := "route " + r.String()
		if err := k.handle.RouteAdd(netlinkRoute(r)); err != nil && !errors.Is(err, unix.EEXIST) {
			if !k.warned[warnKey] {
				k.warned[warnKey] = true
				k.logger.Warn("adding route failed", "route", r.String(), logkey.IfIndex, r.IfIndex, logkey.Err, err)
			}
			complete[owner[r]] = false
			continue
		}
		delete(k.warned, warnKey)
		installed[r] = true
		added++
	}
	if added+deleted > 0 {
		k.logger.Info("routing tables updated", "added", added, "deleted", deleted)
	}
	return complete
}

func (k *tableKeeper) warnNoGatewayLocked(ap *policy.AccessPoint, noGateway []string) {
	for _, family := range []string{"IPv4", "IPv6"} {
		key := "no gateway " + family + " " + ap.Name
		if !slices.Contains(noGateway, family) {
			delete(k.warned, key)
			continue
		}
		if k.warned[key] {
			continue
		}
		k.warned[key] = true
		k.logger.Warn("no gateway: connections of this family cannot leave the interface's own networks",
			logkey.AccessPoint, ap.Name, logkey.Interface, ap.Interface, "family", family,
			"fix", "set gateway in the policy's access point")
	}
}

// formatRule writes r as ip-rule(8) shows it, which netlink.Rule.String
// does not do for marks.
func formatRule(r netlink.Rule) string {
	family := "-4"
	if r.Family == netlink.FAMILY_V6 {
		family = "-6"
	}
	s := fmt.Sprintf("%s priority %d fwmark %#x", family, r.Priority, r.Mark)
	if r.Mask != nil && *r.Mask != 0xffffffff {
		s += fmt.Sprintf("/%#x", *r.Mask)
	}
	if r.Table == 0 {
		// Listed rules do not carry their action, so a rule without a
		// table is taken for iapd's unreachable rule.
		return s + " unreachable"
	}
	return s + fmt.Sprintf(" lookup %d", r.Table)
}

// routeKeyOf reduces an installed route to the fields iapd sets. It returns
// false for a route iapd never installs, such as a multipath route.
func routeKeyOf(r netlink.Route) (tableRoute, bool) {
	if len(r.MultiPath) > 0 || r.Dst == nil {
		return tableRoute{}, false
	}
	dst, ok := prefixFromIPNet(r.Dst)
	if !ok {
		return tableRoute{}, false
	}
	key := tableRoute{
		Table:   r.Table,
		Dst:     dst.Masked(),
		IfIndex: r.LinkIndex,
		OnLink:  r.Flags&int(netlink.FLAG_ONLINK) != 0,
	}
	if r.Gw != nil {
		key.Gateway, _ = addrFromIP(r.Gw)
	}
	return key, true
}

// netlinkRoute turns r into the netlink request that installs it.
func netlinkRoute(r tableRoute) *netlink.Route {
	nr := &netlink.Route{
		LinkIndex: r.IfIndex,
		Table:     r.Table,
		Dst:       &net.IPNet{IP: r.Dst.Addr().AsSlice(), Mask: net.CIDRMask(r.Dst.Bits(), r.Dst.Addr().BitLen())},
		Protocol:  unix.RTPROT_STATIC,
		Scope:     netlink.SCOPE_LINK,
	}
	if r.Gateway.IsValid() {
		nr.Gw = r.Gateway.AsSlice()
		nr.Scope = netlink.SCOPE_UNIVERSE
	}
	if r.OnLink {
		nr.Flags = int(netlink.FLAG_ONLINK)
	}
	return nr
}

// checkReversePathFilterLocked warns once per interface instance when
// strict reverse path filtering is on for a bound access point's
// interface: it drops replies that arrive on an interface that is not the
// main table's route back to the sender, which is every reply iapd's
// tables bring in on a non-default interface.
//
// NOTE: /proc/sys/net shows the network namespace of the thread that opens
// it, so this reads the namespace the reconciling goroutine runs in, which
// is iapd's only one outside of tests.
func (k *tableKeeper) checkReversePathFilterLocked(s *Snapshot) {
	for _, ap := range k.bound {
		ifc, ok := s.Interface(ap.Interface)
		if !ok || k.rpChecked[ifc.Name] == ifc.Index {
			continue
		}
		k.rpChecked[ifc.Name] = ifc.Index

		all, errAll := readSysctlInt(filepath.Join(procSysNet, "ipv4/conf/all/rp_filter"))
		own, errOwn := readSysctlInt(filepath.Join(procSysNet, "ipv4/conf", ifc.Name, "rp_filter"))
		if err := errors.Join(errAll, errOwn); err != nil {
			k.logger.Debug("reading rp_filter failed", logkey.Interface, ifc.Name, logkey.Err, err)
			continue
		}
		// The kernel applies the larger of the two values.
		if max(all, own) != 1 {
			continue
		}
		name := "net.ipv4.conf.all.rp_filter"
		if own == 1 {
			// sysctl(8) writes a dot inside an interface name as a slash.
			name = "net.ipv4.conf." + strings.ReplaceAll(ifc.Name, ".", "/") + ".rp_filter"
		}
		k.logger.Warn("strict reverse path filtering drops replies that arrive on a non-default interface",
			logkey.AccessPoint, ap.Name, logkey.Interface, ifc.Name, "sysctl", name, "value", 1,
			"fix", "set "+name+"=2 (loose)")
	}
}

// checkLooseFilterLocked warns, once until the condition ends, for each
// bound access point whose interface has loose reverse path filtering
// while the main table has no IPv4 default route. Loose mode accepts a
// packet when the main table has a route back to its source through any
// interface, so without a default route it drops every reply from an
// off-link address, on every interface.
func (k *tableKeeper) checkLooseFilterLocked(s *Snapshot) {
	_, _, hasDefault := s.Default(false)
	for _, ap := range k.bound {
		key := "loose rp_filter " + ap.Name
		ifc, ok := s.Interface(ap.Interface)
		if hasDefault || !ok || !ifc.Up {
			delete(k.warned, key)
			continue
		}
		if k.warned[key] {
			continue
		}
		all, errAll := readSysctlInt(filepath.Join(procSysNet, "ipv4/conf/all/rp_filter"))
		own, errOwn := readSysctlInt(filepath.Join(procSysNet, "ipv4/conf", ifc.Name, "rp_filter"))
		if errAll != nil || errOwn != nil || max(all, own) != 2 {
			continue
		}
		k.warned[key] = true
		k.logger.Warn("the main table has no IPv4 default route, so loose reverse path filtering drops replies from off-link addresses",
			logkey.AccessPoint, ap.Name, logkey.Interface, ifc.Name,
			"fix", "keep a default route of any metric in the main table, or set net.ipv4.conf.all.rp_filter=0 and net.ipv4.conf."+
				strings.ReplaceAll(ifc.Name, ".", "/")+".rp_filter=0")
	}
}

func readSysctlInt(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("parsing %s: %w", path, err)
	}
	return v, nil
}

var _ routeKeeper = (*tableKeeper)(nil)
