package iface

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"iapd/internal/logkey"
	"iapd/policy"
)

// HealthConfig holds the settings of NewHealth.
type HealthConfig struct {
	Policy  *policy.Policy // required
	Manager *Manager       // required: interface state, routing tables and dialers
	// GatewayDial, if set, dials target (host:port, the name unresolved)
	// through an access point's gateway proxy. The tcp and http probes of
	// an access point with a gateway proxy go through it, so that they
	// measure the gateway and not only the interface that reaches it.
	GatewayDial func(ctx context.Context, ap *policy.AccessPoint, target string) (net.Conn, error)

	// Resolve looks up a host name of a tcp or http probe with the access
	// point's own resolver. Nil makes such probes fail on names.
	Resolve LookupFunc
	// Query looks up the name of a dns probe with the access point's own
	// resolver, asking its servers even when an answer is cached. Nil makes
	// dns probes fail.
	Query  LookupFunc
	Logger *slog.Logger // nil discards logs
}

// LookupFunc resolves host through ap's resolver.
type LookupFunc func(ctx context.Context, ap *policy.AccessPoint, host string) ([]netip.Addr, error)

// Health decides whether each access point of a policy is usable now: its
// interface state, its routing table, its probe and the failures of real
// dials together. It implements the access point part of
// policy.Conditions and calls registered callbacks with every change. It
// is safe for concurrent use. Create it with NewHealth and stop its probes
// with Close.
type Health struct {
	cfg    HealthConfig
	logger *slog.Logger
	now    func() time.Time // replaced by tests

	// probesMu serializes Update and Close, which replace or stop probes.
	probesMu sync.Mutex
	probes   *probeGroup // the probers of the policy in force

	// updateMu serializes updates, so that callbacks see the changes of
	// one access point in the order they happened.
	updateMu sync.Mutex

	mu  sync.Mutex // protects everything below
	aps map[*policy.AccessPoint]*apHealth
	// prev is aps of the policy before the last Update, for plans made
	// with its apps while a reload swaps the policy.
	prev      map[*policy.AccessPoint]*apHealth
	callbacks map[int]func(Change)
	nextID    int
	closed    bool

	unregisterHook func()
}

// probeGroup is the probers of one policy's access points.
type probeGroup struct {
	ctx    context.Context // cancelled to stop them, which ends probes in flight
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// startProbes starts a prober for every access point of p with a probe.
func (h *Health) startProbes(p *policy.Policy, aps map[*policy.AccessPoint]*apHealth) *probeGroup {
	g := &probeGroup{}
	g.ctx, g.cancel = context.WithCancel(context.Background())
	for _, ap := range p.AccessPointOrder {
		if ap.Probe == nil {
			continue
		}
		g.wg.Add(1)
		go h.probeLoop(g, ap, aps[ap])
	}
	return g
}

// stop ends the probers and waits for them.
func (g *probeGroup) stop() {
	g.cancel()
	g.wg.Wait()
}

// apHealth is the state that Health keeps for one access point.
type apHealth struct {
	status     policy.Status
	everUsable bool          // usable at some time since start, so a return is held down
	ifindex    int           // of the interface when last seen; 0 for none or interface: default
	kick       chan struct{} // wakes its prober; capacity 1

	probe probeState
}

// Change is a change of one access point's status: whether it is usable
// and why not, the families or link facts it has, or its latency.
type Change struct {
	AccessPoint *policy.AccessPoint
	Old, New    policy.Status
}

// UsableChanged reports whether the access point became usable or stopped
// being usable.
func (c Change) UsableChanged() bool { return c.Old.Usable != c.New.Usable }

// NewHealth computes the status of every access point of cfg.Policy from
// the current interface state, starts the probes, and follows every
// re-read of interface state. Probes of an access point run while its
// link is usable; the first one right away.
func NewHealth(cfg HealthConfig) *Health {
	if cfg.Policy == nil || cfg.Manager == nil {
		panic("iface.NewHealth: nil Policy or Manager")
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	h := &Health{
		cfg:       cfg,
		logger:    logger.With(logkey.Component, "iface.health"),
		now:       time.Now,
		aps:       make(map[*policy.AccessPoint]*apHealth, len(cfg.Policy.AccessPointOrder)),
		callbacks: make(map[int]func(Change)),
	}
	for _, ap := range cfg.Policy.AccessPointOrder {
		h.aps[ap] = &apHealth{kick: make(chan struct{}, 1)}
	}
	h.update()
	h.probes = h.startProbes(cfg.Policy, h.aps)
	// Registered after the manager's own hook, so every update sees the
	// routing tables that the manager has just reconciled.
	h.unregisterHook = cfg.Manager.Monitor().registerReadHook(func(*Snapshot) { h.update() })
	return h
}

// Status returns ap's status now. It implements the access point part of
// policy.Conditions. An access point of neither the policy nor the one
// before the last Update is not usable.
func (h *Health) Status(ap *policy.AccessPoint) policy.Status {
	h.mu.Lock()
	defer h.mu.Unlock()
	st, ok := h.aps[ap]
	if !ok {
		st, ok = h.prev[ap]
	}
	if !ok {
		return policy.Status{Reason: fmt.Sprintf("access point %q is not in the policy", ap.Name)}
	}
	return st.status
}

// RegisterChangeCallback arranges for fn to be called with every change of
// an access point's status. Calls come one at a time, in order, and must
// not call RegisterChangeCallback, Close or the Dial methods. It returns
// the function that removes fn.
func (h *Health) RegisterChangeCallback(fn func(Change)) (unregister func()) {
	h.mu.Lock()
	defer h.mu.Unlock()
	id := h.nextID
	h.nextID++
	h.callbacks[id] = fn
	return func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		delete(h.callbacks, id)
	}
}

// DialSucceeded records that a real connection through ap connected, or
// was refused by its target, which shows that the way out works.
func (h *Health) DialSucceeded(ap *policy.AccessPoint) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if st, ok := h.aps[ap]; ok {
		st.probe.dialFailures = 0
	}
}

// DialFailed records that a real connection through ap failed in a way
// that points at the access point: a timeout, no route, or no DNS answer.
// When the access point has a probe with dial_failures set, that many
// failures in a row make it unusable until its probe passes again.
//
// NOTE: a target that is down for everyone fails the same way, so a
// client that keeps dialling a dead host can take a working access point
// out of use until its probe brings it back.
func (h *Health) DialFailed(ap *policy.AccessPoint, err error) {
	h.mu.Lock()
	st, ok := h.aps[ap]
	if !ok || ap.Probe == nil || ap.Probe.DialFailures == 0 {
		h.mu.Unlock()
		return
	}
	marked := st.probe.dialFailed(ap.Probe, err)
	h.mu.Unlock()

	if marked {
		h.logger.Debug("dials failed, probing again", logkey.AccessPoint, ap.Name, logkey.Err, err)
		kick(st.kick)
		h.update()
	}
}

// Update switches h to p, a reloaded policy. An access point that keeps its
// name, interface and probe keeps its status and probe results, so that
// the reload alone reports no change of it. The others start afresh, as
// at NewHealth, and the probes of removed ones stop. Until the next
// Update, Status still returns the status of the previous policy's access
// points, because a reload swaps the policy in the proxy and the DNS
// listeners a moment after h. Those that carried over follow their new
// state, and the others keep their last one.
func (h *Health) Update(p *policy.Policy) {
	h.probesMu.Lock()
	defer h.probesMu.Unlock()

	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return
	}
	byName := make(map[string]*policy.AccessPoint, len(h.aps))
	for ap := range h.aps {
		byName[ap.Name] = ap
	}
	aps := make(map[*policy.AccessPoint]*apHealth, len(p.AccessPointOrder))
	for _, ap := range p.AccessPointOrder {
		if prev, ok := byName[ap.Name]; ok && prev.Interface == ap.Interface && sameProbe(prev.Probe, ap.Probe) {
			aps[ap] = h.aps[prev]
			continue
		}
		aps[ap] = &apHealth{kick: make(chan struct{}, 1)}
	}
	h.cfg.Policy = p
	h.prev, h.aps = h.aps, aps
	h.mu.Unlock()

	// The probers of the previous policy hold its access points; those
	// of the new one take over the states that carried over.
	h.probes.stop()
	h.probes = h.startProbes(p, aps)
	h.update()
}

// sameProbe reports whether a and b probe alike.
func sameProbe(a, b *policy.Probe) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

// Close stops the probes and stops following interface state. Callbacks
// are not called after Close returns. It is idempotent.
func (h *Health) Close() error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return nil
	}
	h.closed = true
	h.mu.Unlock()

	h.unregisterHook()
	h.probesMu.Lock()
	h.probes.stop()
	h.probesMu.Unlock()
	return nil
}

// update recomputes every access point's status and calls the callbacks
// with the changes.
func (h *Health) update() {
	h.updateMu.Lock()
	defer h.updateMu.Unlock()

	s := h.cfg.Manager.Snapshot()
	now := h.now()
	var changes []Change
	var resumed []*apHealth

	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return
	}
	for _, ap := range h.cfg.Policy.AccessPointOrder {
		st := h.aps[ap]
		if c, ok := h.recreatedLocked(s, ap, st); ok {
			changes = append(changes, c)
		}
		linkOK, next := h.linkStatus(s, ap)
		switch {
		case !linkOK && st.probe.linkOK:
			// A probe result from before the link went away is no
			// evidence about the link that comes back.
			st.probe.reset()
		case linkOK && !st.probe.linkOK:
			resumed = append(resumed, st)
		}
		st.probe.linkOK = linkOK
		if linkOK && ap.Probe != nil {
			next.Usable, next.Reason = st.probe.usable(ap.Probe)
			next.Latency = st.probe.latencyIfUp()
		}
		if ap.Probe != nil {
			next.Probe = st.probe.describe(ap.Probe)
		}

		next.Since = st.status.Since
		if next.Usable && !st.status.Usable {
			if st.everUsable {
				next.Since = now
			}
			st.everUsable = true
		}
		if differs(st.status, next) {
			changes = append(changes, Change{AccessPoint: ap, Old: st.status, New: next})
		}
		st.status = next
	}
	callbacks := mapValues(h.callbacks)
	h.mu.Unlock()

	for _, st := range resumed {
		kick(st.kick)
	}
	for _, c := range changes {
		for _, fn := range callbacks {
			fn(c)
		}
	}
}

// recreatedLocked notices that ap's interface was deleted and created
// again between two reads, which leaves no snapshot where it is missing.
// Connections over the old interface are dead, and a probe result of it
// is no evidence about the new one. So a usable access point counts as
// lost for a moment: recreatedLocked returns that change, and the update
// that follows brings the access point back.
func (h *Health) recreatedLocked(s *Snapshot, ap *policy.AccessPoint, st *apHealth) (Change, bool) {
	idx := 0
	if ifc, ok := s.Interface(ap.Interface); ok && !ap.IsDefault() {
		idx = ifc.Index
	}
	old := st.ifindex
	st.ifindex = idx
	if old == 0 || idx == 0 || old == idx {
		return Change{}, false
	}

	st.probe.reset()
	st.probe.linkOK = false
	if !st.status.Usable {
		return Change{}, false
	}
	lost := st.status
	lost.Usable = false
	lost.Reason = fmt.Sprintf("interface %s was re-created with index %d", ap.Interface, idx)
	lost.Latency = 0
	c := Change{AccessPoint: ap, Old: st.status, New: lost}
	st.status = lost
	return c, true
}

// linkStatus returns the status of ap as interface state and routing
// tables give it, and whether those let the probe run.
func (h *Health) linkStatus(s *Snapshot, ap *policy.AccessPoint) (bool, policy.Status) {
	var st policy.Status
	st.Usable, st.Reason = s.Usable(ap)
	st.IPv4, st.IPv6 = s.Families(ap)
	st.Link = s.Link(h.cfg.Policy, ap)
	if st.Usable && !h.cfg.Manager.RoutesReady(ap) {
		st.Usable = false
		st.Reason = fmt.Sprintf("routing table of interface %s is not installed yet", ap.Interface)
	}
	return st.Usable, st
}

// differs reports whether b is a change worth telling from a: everything
// but the probe's words, which change with every probe.
func differs(a, b policy.Status) bool {
	return a.Usable != b.Usable || a.Reason != b.Reason || !a.Since.Equal(b.Since) ||
		a.IPv4 != b.IPv4 || a.IPv6 != b.IPv6 || a.Latency != b.Latency || a.Link != b.Link
}

// kick wakes a prober without blocking; kicks coalesce.
func kick(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// probeLoop probes ap every interval while its link is usable, and at
// once when kicked. Probes start an interval apart, not an interval after
// the previous one ended, so that failures in a row take the access point
// down within interval × failures plus one timeout.
func (h *Health) probeLoop(g *probeGroup, ap *policy.AccessPoint, st *apHealth) {
	defer g.wg.Done()
	p := ap.Probe
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-g.ctx.Done():
			return
		case <-timer.C:
		case <-st.kick:
		}

		start := time.Now()
		h.mu.Lock()
		linkOK := st.probe.linkOK
		h.mu.Unlock()
		if linkOK {
			h.probeOnce(g.ctx, ap, st)
		}
		timer.Reset(time.Until(start.Add(p.Interval)))
	}
}

// probeOnce sends ap's probe, records the result and updates the statuses.
func (h *Health) probeOnce(groupCtx context.Context, ap *policy.AccessPoint, st *apHealth) {
	ctx, cancel := context.WithTimeout(groupCtx, ap.Probe.Timeout)
	var rtt time.Duration
	var err error
	if ap.Proxy != nil && h.cfg.GatewayDial != nil {
		dial := func(ctx context.Context, target string) (net.Conn, error) { return h.cfg.GatewayDial(ctx, ap, target) }
		rtt, err = sendProbe(ctx, ap, dial, h.cfg.Query)
	} else {
		rtt, err = SendProbe(ctx, ap, h.cfg.Manager.Dialer(ap), h.cfg.Resolve, h.cfg.Query)
	}
	cancel()
	if groupCtx.Err() != nil {
		return
	}

	if err != nil {
		h.logger.Debug("probe failed", logkey.AccessPoint, ap.Name, logkey.Err, err)
	} else {
		h.logger.Debug("probe passed", logkey.AccessPoint, ap.Name, "rtt", rtt)
	}
	h.mu.Lock()
	st.probe.record(ap.Probe, rtt, err)
	h.mu.Unlock()
	h.update()
}
