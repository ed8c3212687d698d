package iface

import (
	"errors"
	"log/slog"
	"sync"

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
// It is safe for concurrent use. Create it with NewManager and release the
// kernel state it installed with Close.
type Manager struct {
	monitor    *Monitor
	ownMonitor bool
	dialers    map[*policy.AccessPoint]*Dialer
	routes     routeKeeper // nil when no access point is bound to an interface

	unregisterHook func() // stops routes following the monitor; nil when routes is

	closeOnce sync.Once
	closeErr  error
}

// routeKeeper is the seam between the portable manager and the kernel's
// routing tables.
type routeKeeper interface {
	// reconcile brings iapd's tables and rules in line with s.
	reconcile(s *Snapshot)
	// removeAll deletes every rule and route iapd installed; reconcile does
	// nothing afterwards.
	removeAll() error
}

func newDialers(p *policy.Policy, monitor *Monitor) map[*policy.AccessPoint]*Dialer {
	dialers := make(map[*policy.AccessPoint]*Dialer, len(p.AccessPointOrder))
	for _, ap := range p.AccessPointOrder {
		d := &Dialer{ap: ap, monitor: monitor}
		if !ap.IsDefault() {
			d.mark = p.Routing.Mark + uint32(ap.Index)
		}
		dialers[ap] = d
	}
	return dialers
}

// Snapshot returns the latest interface state. It is never nil.
func (m *Manager) Snapshot() *Snapshot { return m.monitor.Snapshot() }

// Monitor returns the monitor the manager follows, so that other parts can
// register for changes.
func (m *Manager) Monitor() *Monitor { return m.monitor }

// Dialer returns the dialer of ap, the same one on every call. For an
// access point that is not in the manager's policy it returns nil, whose
// dials fail with ErrUnknownAccessPoint.
func (m *Manager) Dialer(ap *policy.AccessPoint) *Dialer {
	return m.dialers[ap]
}

// Close removes every routing rule and route the manager added, and closes
// the monitor when the manager created it. It is idempotent.
func (m *Manager) Close() error {
	m.closeOnce.Do(func() {
		var errs []error
		if m.unregisterHook != nil {
			m.unregisterHook()
		}
		if m.routes != nil {
			errs = append(errs, m.routes.removeAll())
		}
		// The monitor's goroutine may be running the read hook. removeAll
		// waited for any reconcile in progress and marked the keeper
		// closed, so a later reconcile returns at once and closing the
		// monitor, which waits for that goroutine, cannot deadlock.
		if m.ownMonitor {
			errs = append(errs, m.monitor.Close())
		}
		m.closeErr = errors.Join(errs...)
	})
	return m.closeErr
}
