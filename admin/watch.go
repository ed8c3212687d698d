package admin

import (
	"log/slog"
	"strings"

	"iapd/iface"
	"iapd/internal/event"
	"iapd/internal/logkey"
	"iapd/policy"
)

// Watcher turns changes of the interfaces that a policy names into events:
// interfaces added (also when re-created under a new index), removed,
// going up or down, or changing addresses. It also publishes the events
// of other parts through Publish, so that every event is logged the same
// way. It is safe for concurrent use; create it with NewWatcher.
type Watcher struct {
	bus     *event.Bus
	metrics *Metrics // nil counts nothing
	policy  func() *policy.Policy
	logger  *slog.Logger
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
	}
}

// Changed publishes the changes from old to cur of the interfaces of the
// policy's access points and of its interfaces section. It is meant for
// iface.Monitor.RegisterChangeCallback.
func (w *Watcher) Changed(old, cur *iface.Snapshot) {
	p := w.policy()
	names := make(map[string]bool)
	for _, ap := range p.AccessPointOrder {
		if !ap.IsDefault() {
			names[ap.Interface] = true
		}
	}
	for name := range p.Interfaces {
		names[name] = true
	}

	for _, c := range iface.Changes(old, cur) {
		name := c.Interface.Name
		if !names[name] {
			continue
		}
		e := event.Event{Kind: event.Kind(c.Kind), Interface: name}
		switch c.Kind {
		case iface.LinkDown:
			e.Reason = "no carrier"
			if !c.Interface.Up {
				e.Reason = "administratively down"
			}
		case iface.LinkAdded:
			if strings.HasPrefix(c.Detail, "re-created") {
				e.Reason = c.Detail
			}
		}
		w.Publish(e)
	}
}

// Publish logs e at Info, with its kind as the message, and publishes it
// on the bus. A destination switch is counted in the metrics too.
func (w *Watcher) Publish(e event.Event) {
	var attrs []any
	for _, kv := range [][2]string{
		{logkey.Interface, e.Interface}, {logkey.AccessPoint, e.AccessPoint}, {logkey.Destination, e.Destination},
		{"from", e.From}, {"to", e.To}, {"reason", e.Reason},
	} {
		if kv[1] != "" {
			attrs = append(attrs, kv[0], kv[1])
		}
	}
	if e.Count > 0 {
		attrs = append(attrs, "count", e.Count)
	}
	w.logger.Info(string(e.Kind), attrs...)
	w.bus.Publish(e)
	if e.Kind == event.DestinationSwitched && w.metrics != nil {
		w.metrics.DestinationSwitched(e.Destination)
	}
}
