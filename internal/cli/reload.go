package cli

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"iapd/admin"
	"iapd/internal/event"
	"iapd/internal/logkey"
	"iapd/policy"
	"iapd/proxy"
)

// reloadLocked loads the policy file and applies it in two phases. The
// first checks everything and opens every new socket; when anything fails,
// it closes what it opened and the running policy stays in place. The
// second cannot fail: it swaps the policy into the interface manager,
// resolvers and listeners. d.reloadMu must be held.
func (d *daemon) reloadLocked() (*admin.ReloadReport, error) {
	old := d.Policy()
	p, err := policy.Load(old.Path)
	if err != nil {
		return nil, err
	}
	if err := checkControlUnchanged(old, p); err != nil {
		return nil, err
	}

	plan := planListeners(d.listeners, p)
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
		Policy:           admin.PolicyStatus{Path: p.Path, Hash: p.Hash},
		Changed:          p.Hash != old.Hash,
		ListenersKept:    []string{},
		ListenersAdded:   []string{},
		ListenersRemoved: []string{},
	}
	d.listeners = plan.apply(d, report)
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

// listenerPlan is the change a reload makes to the listeners: the sockets
// that stay with a new policy listener, those that close and those that open.
type listenerPlan struct {
	next    []*openListener // the new policy's listeners, in its order
	added   []*openListener // of next, those whose sockets are new
	removed []*openListener // old listeners that no new one matches
}

// planListeners matches the listeners of p with the open ones by address.
// Listeners with the same address are matched in order, which pairs
// several port-0 listeners on one host up one to one.
func planListeners(open []*openListener, p *policy.Policy) *listenerPlan {
	plan := &listenerPlan{}
	free := slices.Clone(open)
	for _, l := range p.Listeners {
		key := listenKey(l.Listen)
		i := slices.IndexFunc(free, func(ol *openListener) bool { return ol != nil && ol.key == key })
		if i < 0 {
			ol := &openListener{l: l, key: key}
			plan.next = append(plan.next, ol)
			plan.added = append(plan.added, ol)
			continue
		}
		plan.next = append(plan.next, &openListener{l: l, ln: free[i].ln, key: key})
		free[i] = nil
	}
	for _, ol := range free {
		if ol != nil {
			plan.removed = append(plan.removed, ol)
		}
	}
	return plan
}

// open opens the sockets of the added listeners, or none of them.
//
// TODO: a listener that moves to an address overlapping a removed one
// (127.0.0.1:1080 to 0.0.0.0:1080) fails to open while the old socket is
// still open, so such a change is rejected and needs a restart.
func (plan *listenerPlan) open() error {
	for _, ol := range plan.added {
		ln, err := proxy.Listen(context.Background(), ol.l.Listen)
		if err != nil {
			plan.abort()
			return fmt.Errorf("opening listener %s: %w", ol.l.Listen, err)
		}
		ol.ln = ln
	}
	return nil
}

// abort closes the sockets that open opened.
func (plan *listenerPlan) abort() {
	for _, ol := range plan.added {
		if ol.ln != nil {
			ol.ln.Close()
			ol.ln = nil
		}
	}
}

// apply hands the kept sockets their new policy listeners, serves the
// added ones and retires the removed ones, whose connections drain. It
// returns the listeners now open.
func (plan *listenerPlan) apply(d *daemon, report *admin.ReloadReport) []*openListener {
	for _, ol := range plan.next {
		if slices.Contains(plan.added, ol) {
			d.serve(ol)
			report.ListenersAdded = append(report.ListenersAdded, ol.l.Listen)
			continue
		}
		if err := d.proxy.Update(ol.ln, ol.l); err != nil {
			// The socket is open and served, so this is a programming error.
			d.logger.Error("updating listener failed", logkey.Listener, ol.l.Listen, logkey.Err, err, "unexpected", true)
		}
		report.ListenersKept = append(report.ListenersKept, ol.l.Listen)
	}
	for _, ol := range plan.removed {
		if err := d.proxy.Retire(ol.ln); err != nil {
			d.logger.Error("retiring listener failed", logkey.Listener, ol.l.Listen, logkey.Err, err)
		}
		report.ListenersRemoved = append(report.ListenersRemoved, ol.l.Listen)
	}
	return plan.next
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
