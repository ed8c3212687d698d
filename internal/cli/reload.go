package cli

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"iapd/admin"
	"iapd/internal/event"
	"iapd/policy"
)

// reloadLocked loads the policy file and applies it in two phases. The
// first checks everything and opens every new socket, proxy and DNS
// listeners alike. When anything fails, it closes what it opened, so the
// running policy stays in place. The second phase cannot fail: it swaps
// the policy into the interface manager, resolvers and listeners.
// d.reloadMu must be held.
func (d *daemon) reloadLocked() (*admin.ReloadReport, error) {
	old := d.Policy()
	p, err := policy.Load(old.Path)
	if err != nil {
		return nil, err
	}
	if err := checkControlUnchanged(old, p); err != nil {
		return nil, err
	}

	plan := planListeners(d.listeners, d.dnsListeners, p, d.logger)
	if err := plan.open(); err != nil {
		return nil, err
	}
	var web net.Listener
	if p.Control.HTTP != d.webAddr && p.Control.HTTP != "" {
		web, err = net.Listen("tcp", p.Control.HTTP)
		if err != nil {
			plan.abort()
			return nil, fmt.Errorf("opening control HTTP listener %s: %w", p.Control.HTTP, err)
		}
	}
	if err := d.links.Update(p); err != nil {
		plan.abort()
		if web != nil {
			web.Close()
		}
		return nil, fmt.Errorf("applying the policy to the interfaces: %w", err)
	}

	// From here on nothing fails: the new policy takes over.
	d.supervisor.update(p)
	d.network.update(p)
	d.proxy.SetLimits(p.Limits)
	d.pol.Store(p)
	report := &admin.ReloadReport{
		Policy:              admin.PolicyStatus{Path: p.Path, Hash: p.Hash},
		Changed:             p.Hash != old.Hash,
		ListenersKept:       []string{},
		ListenersAdded:      []string{},
		ListenersRemoved:    []string{},
		DNSListenersKept:    []string{},
		DNSListenersAdded:   []string{},
		DNSListenersRemoved: []string{},
	}
	plan.apply(d, report)
	if p.Control.HTTP != d.webAddr {
		d.swapWeb(web, p.Control.HTTP)
	}
	report.ConnectionsClosed = d.closeChangedAccessPoints(old, p)
	d.supervisor.evaluate()
	return report, nil
}

// checkControlUnchanged rejects a change of the control socket: the
// command line that asked for the reload talks through it.
func checkControlUnchanged(old, p *policy.Policy) error {
	if old.Control.Socket != p.Control.Socket || old.Control.SocketMode != p.Control.SocketMode {
		return errors.New("control.socket or control.socket_mode changed: restart iapd to move the control socket")
	}
	return nil
}

// closeChangedAccessPoints closes the connections over access points that
// the reload removed or moved to another interface, gateway or source
// address: their sockets are bound to what no longer applies. It returns
// how many it closed.
func (d *daemon) closeChangedAccessPoints(old, p *policy.Policy) int {
	total := 0
	for _, before := range old.AccessPointOrder {
		after, kept := p.AccessPoints[before.Name]
		reason := "access point removed by a reload"
		if kept {
			if sameBinding(before, after) {
				continue
			}
			reason = "access point changed by a reload"
		}
		n := d.proxy.CloseAccessPoint(before.Name)
		if n == 0 {
			continue
		}
		total += n
		d.bus.Publish(event.Event{Kind: event.ConnectionsClosed, AccessPoint: before.Name, Count: n, Reason: reason})
	}
	return total
}

// sameBinding reports whether a and b send connections alike.
func sameBinding(a, b *policy.AccessPoint) bool {
	return a.Interface == b.Interface && slices.Equal(a.Gateways, b.Gateways) && slices.Equal(a.Sources, b.Sources)
}

// reloadingState returns the sd_notify(3) message that starts a reload:
// RELOADING=1 with the monotonic time, which systemd 253 and later want
// with it.
func reloadingState() string {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return "RELOADING=1"
	}
	usec := ts.Nano() / int64(time.Microsecond)
	return fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d", usec)
}
