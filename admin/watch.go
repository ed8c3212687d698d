package admin

import (
	"log/slog"
	"slices"
	"sync"

	"iapd/iface"
	"iapd/internal/event"
	"iapd/internal/logkey"
	"iapd/policy"
)

// Watcher turns changes of interface state into events: interfaces of the
// policy's access points going up, down or changing addresses, access
// points becoming usable or not, and destinations switching their first
// choice. It is safe for concurrent use; create it with NewWatcher.
type Watcher struct {
	bus     *event.Bus
	metrics *Metrics // nil counts nothing
	policy  func() *policy.Policy
	logger  *slog.Logger

	mu     sync.Mutex        // protects usable, choice and primed
	usable map[string]bool   // by access point name, as last published
	choice map[string]string // first choice by destination name; "" for none
	primed bool              // a first Check has recorded the state
}

// NewWatcher returns a watcher that publishes on bus and reads the current
// policy from pol. metrics may be nil.
func NewWatcher(bus *event.Bus, metrics *Metrics, pol func() *policy.Policy, logger *slog.Logger) *Watcher {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Watcher{
		bus:     bus,
		metrics: metrics,
		policy:  pol,
		logger:  logger.With(logkey.Component, "events"),
		usable:  make(map[string]bool),
		choice:  make(map[string]string),
	}
}

// Changed publishes the changes from old to cur. It is meant for
// iface.Monitor.RegisterChangeCallback.
func (w *Watcher) Changed(old, cur *iface.Snapshot) {
	names := make(map[string]bool)
	for _, ap := range w.policy().AccessPointOrder {
		if !ap.IsDefault() {
			names[ap.Interface] = true
		}
	}
	for name := range names {
		w.interfaceChanged(name, old, cur)
	}
	w.Check(cur)
}

func (w *Watcher) interfaceChanged(name string, old, cur *iface.Snapshot) {
	before, had := old.Interface(name)
	after, has := cur.Interface(name)
	switch {
	case !had && !has:
		return
	case !had:
		w.publish(event.Event{Kind: event.InterfaceAdded, Interface: name})
	case !has:
		w.publish(event.Event{Kind: event.InterfaceRemoved, Interface: name})
		return
	}
	running := func(ifc *iface.Interface) bool { return ifc != nil && ifc.Up && ifc.Carrier }
	if had && running(before) != running(after) {
		kind, reason := event.InterfaceUp, ""
		if !running(after) {
			kind, reason = event.InterfaceDown, "no carrier"
			if !after.Up {
				reason = "administratively down"
			}
		}
		w.publish(event.Event{Kind: kind, Interface: name, Reason: reason})
	}
	if had && !slices.Equal(before.Addrs, after.Addrs) {
		w.publish(event.Event{Kind: event.InterfaceReaddressed, Interface: name})
	}
}

// Check publishes the access points whose usability under u changed and
// the destinations whose first choice changed since the last Check. The
// first Check only records the state. Call it after a reload too, so that
// new access points and destinations are reported.
func (w *Watcher) Check(u policy.Usability) {
	p := w.policy()
	w.mu.Lock()
	defer w.mu.Unlock()

	for _, ap := range p.AccessPointOrder {
		ok, reason := u.Usable(ap)
		was, known := w.usable[ap.Name]
		w.usable[ap.Name] = ok
		if w.primed && (!known || was != ok) {
			kind := event.AccessPointUsable
			if !ok {
				kind = event.AccessPointUnusable
			}
			w.publish(event.Event{Kind: kind, AccessPoint: ap.Name, Interface: ap.Interface, Reason: reason})
		}
	}

	for _, dest := range sortedDestinations(p) {
		current, reason := currentChoice(dest, u)
		was, known := w.choice[dest.Name]
		w.choice[dest.Name] = current
		if !w.primed || !known || was == current {
			continue
		}
		w.publish(event.Event{Kind: event.DestinationSwitched, Destination: dest.Name, From: was, To: current, Reason: reason})
		if w.metrics != nil {
			w.metrics.DestinationSwitched(dest.Name)
		}
	}
	w.primed = true
}

func (w *Watcher) publish(e event.Event) {
	var attrs []any
	for _, kv := range [][2]string{
		{logkey.Interface, e.Interface}, {logkey.AccessPoint, e.AccessPoint}, {logkey.Destination, e.Destination},
		{"from", e.From}, {"to", e.To}, {"reason", e.Reason},
	} {
		if kv[1] != "" {
			attrs = append(attrs, kv[0], kv[1])
		}
	}
	w.logger.Info(string(e.Kind), attrs...)
	w.bus.Publish(e)
}
