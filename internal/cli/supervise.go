package cli

import (
	"slices"
	"sync"
	"time"

	"iapd/admin"
	"iapd/iface"
	"iapd/internal/event"
	"iapd/policy"
	"iapd/proxy"
)

// supervisor turns changes of the access points' health into events,
// keeps what each destination prefers, and closes connections as the
// destinations' on_lost and on_better rules require. It is safe for
// concurrent use.
type supervisor struct {
	publish    func(event.Event)
	conditions func() *conditions // of the policy in force
	close      func(match func(info proxy.ConnInfo) bool) int

	mu           sync.Mutex // protects everything below
	destinations []*policy.Destination
	evaluated    bool // the first evaluation has run
	stopped      bool
	timers       []holdDownTimer
}

// holdDownTimer re-evaluates the destinations when a hold-down ends.
type holdDownTimer struct {
	timer *time.Timer
	at    time.Time
}

// newSupervisor returns a supervisor of pol's destinations that publishes
// with publish, plans with the conditions that conds returns, and closes
// connections with closeConns.
func newSupervisor(pol *policy.Policy, publish func(event.Event), conds func() *conditions, closeConns func(match func(info proxy.ConnInfo) bool) int) *supervisor {
	sv := &supervisor{publish: publish, conditions: conds, close: closeConns}
	sv.destinations = admin.SortedDestinations(pol)
	return sv
}

// update switches the supervisor to the destinations of a reloaded policy.
func (sv *supervisor) update(pol *policy.Policy) {
	sv.mu.Lock()
	defer sv.mu.Unlock()
	sv.destinations = admin.SortedDestinations(pol)
}

// stop cancels the pending hold-down timers; later changes are ignored.
func (sv *supervisor) stop() {
	sv.mu.Lock()
	defer sv.mu.Unlock()
	sv.stopped = true
	for _, t := range sv.timers {
		t.timer.Stop()
	}
	sv.timers = nil
}

// accessPointChanged publishes an access point becoming usable or not,
// closes the connections it carried when it was lost, and re-evaluates
// the destinations. It is a Health change callback.
func (sv *supervisor) accessPointChanged(c iface.Change) {
	ap := c.AccessPoint
	if c.UsableChanged() {
		e := event.Event{Kind: event.AccessPointUsable, AccessPoint: ap.Name, Interface: c.New.Link.Interface, Reason: c.New.Probe}
		if !c.New.Usable {
			e.Kind, e.Reason = event.AccessPointUnusable, c.New.Reason
		}
		sv.publish(e)
	}
	if c.UsableChanged() && !c.New.Usable {
		sv.closeLost(ap, c.New.Reason)
	}
	if c.UsableChanged() && c.New.Usable && !c.New.Since.IsZero() {
		sv.scheduleHoldDowns(ap, c.New.Since)
	}
	sv.evaluate()
}

// closeLost closes the connections through ap of the destinations whose
// on_lost is close.
func (sv *supervisor) closeLost(ap *policy.AccessPoint, reason string) {
	sv.mu.Lock()
	destinations := sv.destinations
	sv.mu.Unlock()
	for _, d := range destinations {
		if d.OnLost != policy.OnLostClose || !slices.Contains(d.AccessPoints, ap) {
			continue
		}
		n := sv.close(func(info proxy.ConnInfo) bool { return info.Destination == d.Name && info.AccessPoint == ap.Name })
		if n > 0 {
			sv.publish(event.Event{Kind: event.ConnectionsClosed, Destination: d.Name, AccessPoint: ap.Name,
				Count: n, Reason: "access point lost: " + reason})
		}
	}
}

// scheduleHoldDowns arranges a re-evaluation for when each hold-down of a
// destination of ap that came back at since ends, because nothing else
// changes at that moment.
func (sv *supervisor) scheduleHoldDowns(ap *policy.AccessPoint, since time.Time) {
	sv.mu.Lock()
	defer sv.mu.Unlock()
	if sv.stopped {
		return
	}
	seen := make(map[time.Duration]bool)
	for _, d := range sv.destinations {
		if d.HoldDown == 0 || seen[d.HoldDown] || !slices.Contains(d.AccessPoints, ap) {
			continue
		}
		seen[d.HoldDown] = true
		// A millisecond late, so that the plan sees the hold-down over.
		at := since.Add(d.HoldDown + time.Millisecond)
		sv.timers = append(sv.timers, holdDownTimer{timer: time.AfterFunc(time.Until(at), sv.evaluate), at: at})
	}
}

// evaluate plans every destination and publishes those whose preferred
// access point changed, closing connections where on_better requires it.
// The first call records the preferences without events.
func (sv *supervisor) evaluate() {
	sv.mu.Lock()
	defer sv.mu.Unlock()
	if sv.stopped {
		return
	}
	first := !sv.evaluated
	sv.evaluated = true
	now := time.Now()
	sv.timers = slices.DeleteFunc(sv.timers, func(t holdDownTimer) bool { return !t.at.After(now) })

	conds := sv.conditions()
	for _, d := range sv.destinations {
		plan := policy.PlanDestination(d, conds)
		var head *policy.AccessPoint
		if len(plan.Candidates) > 0 {
			head = plan.Candidates[0]
		}
		prev := conds.Current(d)
		if head == prev {
			continue
		}
		conds.setCurrent(d, head)
		if first {
			continue
		}

		e := event.Event{Kind: event.DestinationSwitched, Destination: d.Name, From: apName(prev), To: apName(head), Reason: plan.Why}
		if head == nil {
			e.Reason = plan.Err().Error()
		}
		sv.publish(e)

		// A switch while the previous access point still works is a
		// better one taking over.
		if d.OnBetter == policy.OnBetterClose && head != nil && prev != nil && conds.Status(prev).Usable {
			n := sv.close(func(info proxy.ConnInfo) bool { return info.Destination == d.Name && info.AccessPoint != head.Name })
			if n > 0 {
				sv.publish(event.Event{Kind: event.ConnectionsClosed, Destination: d.Name, AccessPoint: prev.Name,
					Count: n, Reason: "better access point " + head.Name + " is usable again"})
			}
		}
	}
}

func apName(ap *policy.AccessPoint) string {
	if ap == nil {
		return ""
	}
	return ap.Name
}
