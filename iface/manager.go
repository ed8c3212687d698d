package iface

import (
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"

	"iapd/policy"
)

// ManagerConfig holds the settings of NewManager.
type ManagerConfig struct {
	Policy *policy.Policy // required
	Logger *slog.Logger   // nil discards logs
	// Monitor supplies interface state. Nil makes the manager create its
	// own, which Close then closes; a supplied one stays open.
	Monitor *Monitor
}

// Manager keeps iapd's routing tables and rules in step with the interfaces
// of a policy's access points, and hands out one Dialer per access point.
// It is safe for concurrent use. Create it with NewManager, switch it to a
// reloaded policy with Update, and release the kernel state it installed
// with Close.
type Manager struct {
	monitor    *Monitor
	ownMonitor bool
	logger     *slog.Logger

	dialers atomic.Pointer[dialerSet]

	mu             sync.Mutex // protects everything below
	routing        policy.Routing
	slots          map[string]int // access point name to its table and mark offset
	routes         routeKeeper    // nil while no access point is bound to an interface
	unregisterHook func()         // stops routes following the monitor; nil when routes is
	closed         bool
	closeErr       error
}

// dialerSet holds the dialers of the current policy and of the one before
// it, so that a dial that started before a reload still finds its dialer.
type dialerSet struct {
	cur, prev map[*policy.AccessPoint]*Dialer
}

// routeKeeper is the seam between the portable manager and the kernel's
// routing tables.
type routeKeeper interface {
	// reconcile brings iapd's tables and rules in line with s.
	reconcile(s *Snapshot)
	// update replaces the bound access points and their table and mark
	// offsets, deletes the routes of tables no longer used and reconciles.
	update(bound []*policy.AccessPoint, slots map[string]int, s *Snapshot)
	// removeAll deletes every rule and route iapd installed; reconcile does
	// nothing afterwards.
	removeAll() error
	// isReady reports whether ap's rules and routes were all in place
	// after the last reconcile.
	isReady(ap *policy.AccessPoint) bool
}

// NewDialer returns a dialer of ap, an access point of p, that binds and
// marks its sockets as a Manager's dialer does, but belongs to no Manager:
// it installs nothing, so the mark selects a table only while an iapd with
// the same policy runs. It is for one-off checks such as probes sent by
// "iapd explain".
func NewDialer(p *policy.Policy, ap *policy.AccessPoint, m *Monitor) *Dialer {
	return newDialers(p, assignSlots(p, nil), m, nil)[ap]
}

// newDialers makes the dialers of p's access points, which slots gives
// their mark offsets. routesReady, when not nil, reports whether an access
// point's table is installed.
func newDialers(p *policy.Policy, slots map[string]int, monitor *Monitor, routesReady func(*policy.AccessPoint) bool) map[*policy.AccessPoint]*Dialer {
	dialers := make(map[*policy.AccessPoint]*Dialer, len(p.AccessPointOrder))
	for _, ap := range p.AccessPointOrder {
		d := &Dialer{ap: ap, monitor: monitor}
		if !ap.IsDefault() {
			d.mark = p.Routing.Mark + uint32(slots[ap.Name])
			if routesReady != nil {
				d.routesReady = func() bool { return routesReady(ap) }
			}
		}
		dialers[ap] = d
	}
	return dialers
}

// assignSlots gives every access point of p a table and mark offset. An
// access point that old already numbers keeps its offset, so that the
// marks of its open connections still select its table after a reload;
// the others take the lowest free offsets, in file order. With old nil,
// each access point's offset is its position in the file.
func assignSlots(p *policy.Policy, old map[string]int) map[string]int {
	slots := make(map[string]int, len(p.AccessPointOrder))
	if old == nil {
		for _, ap := range p.AccessPointOrder {
			slots[ap.Name] = ap.Index
		}
		return slots
	}

	taken := make(map[int]bool)
	for _, ap := range p.AccessPointOrder {
		if slot, ok := old[ap.Name]; ok {
			slots[ap.Name] = slot
			taken[slot] = true
		}
	}
	next := 0
	for _, ap := range p.AccessPointOrder {
		if _, ok := slots[ap.Name]; ok {
			continue
		}
		for taken[next] {
			next++
		}
		slots[ap.Name] = next
		taken[next] = true
	}
	return slots
}

// Snapshot returns the latest interface state. It is never nil.
func (m *Manager) Snapshot() *Snapshot { return m.monitor.Snapshot() }

// Monitor returns the monitor the manager follows, so that other parts can
// register for changes.
func (m *Manager) Monitor() *Monitor { return m.monitor }

// RoutesReady reports whether ap's routing table and rules are in place,
// so that its sockets leave through its interface. It is always true for
// interface: default, which has none. Access points are known by name, so
// one of the policy before the last Update stands for its namesake.
func (m *Manager) RoutesReady(ap *policy.AccessPoint) bool {
	if ap.IsDefault() {
		return true
	}
	m.mu.Lock()
	routes := m.routes
	m.mu.Unlock()
	return routes != nil && routes.isReady(ap)
}

// Dialer returns the dialer of ap, the same one on every call. ap is an
// access point of the manager's policy, or of the policy before the last
// Update. For any other access point it returns nil, whose dials fail with
// ErrUnknownAccessPoint.
func (m *Manager) Dialer(ap *policy.AccessPoint) *Dialer {
	set := m.dialers.Load()
	if d, ok := set.cur[ap]; ok {
		return d
	}
	return set.prev[ap]
}

// Close removes every routing rule and route the manager added, and closes
// the monitor when the manager created it. It is idempotent.
func (m *Manager) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return m.closeErr
	}
	m.closed = true

	var errs []error
	if m.unregisterHook != nil {
		m.unregisterHook()
	}
	if m.routes != nil {
		errs = append(errs, m.routes.removeAll())
	}
	// The monitor's goroutine may be running the read hook. removeAll
	// waited for any reconcile in progress and marked the keeper closed,
	// so a later reconcile returns at once and closing the monitor, which
	// waits for that goroutine, cannot deadlock.
	if m.ownMonitor {
		errs = append(errs, m.monitor.Close())
	}
	m.closeErr = errors.Join(errs...)
	return m.closeErr
}
