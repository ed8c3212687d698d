// Package event is iapd's in-process event bus: interfaces going up or
// down, access points becoming usable or not, destinations switching,
// connections closed because of a change, policy reloads. Publishers never
// block on slow subscribers; the bus does not store history.
package event

import (
	"sync"
	"sync/atomic"
	"time"
)

// Kind names what happened.
type Kind string

// Event kinds. The strings are part of the control API and the log.
const (
	InterfaceUp          Kind = "interface_up"
	InterfaceDown        Kind = "interface_down"
	InterfaceReaddressed Kind = "interface_readdressed"
	InterfaceAdded       Kind = "interface_added"
	InterfaceRemoved     Kind = "interface_removed"
	AccessPointUsable    Kind = "access_point_usable"
	AccessPointUnusable  Kind = "access_point_unusable"
	DestinationSwitched  Kind = "destination_switched"
	ConnectionsClosed    Kind = "connections_closed"
	PolicyReloaded       Kind = "policy_reloaded"
	PolicyRejected       Kind = "policy_rejected"
)

// Event is one change. Fields that do not apply to its Kind are empty.
type Event struct {
	Seq         uint64    `json:"seq"` // set by Publish, increasing from 1
	Time        time.Time `json:"time"`
	Kind        Kind      `json:"kind"`
	Interface   string    `json:"interface,omitempty"`
	AccessPoint string    `json:"access_point,omitempty"`
	Destination string    `json:"destination,omitempty"`
	App         string    `json:"app,omitempty"`
	From        string    `json:"from,omitempty"` // previous access point of a switch
	To          string    `json:"to,omitempty"`   // new access point of a switch
	Reason      string    `json:"reason,omitempty"`
	Count       int       `json:"count,omitempty"` // connections closed
}

// Bus delivers published events to every subscriber. The zero value is not
// usable; call NewBus. A Bus is safe for concurrent use.
type Bus struct {
	seq     atomic.Uint64
	dropped atomic.Uint64

	mu   sync.Mutex // protects subs
	subs map[*subscription]struct{}
}

type subscription struct {
	ch chan Event
}

// NewBus returns an empty bus.
func NewBus() *Bus {
	return &Bus{subs: make(map[*subscription]struct{})}
}

// Publish stamps e with the next sequence number (and the time, when unset)
// and hands it to every subscriber whose buffer has room. A subscriber that
// is full misses the event, which Dropped counts, so that a stalled reader
// never holds up the daemon.
func (b *Bus) Publish(e Event) {
	e.Seq = b.seq.Add(1)
	if e.Time.IsZero() {
		e.Time = time.Now()
	}

	b.mu.Lock()
	defer b.mu.Unlock()
	for s := range b.subs {
		select {
		case s.ch <- e:
		default:
			b.dropped.Add(1)
		}
	}
}

// Subscribe returns a channel that receives events published from now on,
// buffering up to buffer of them, and the function that ends the
// subscription and closes the channel.
func (b *Bus) Subscribe(buffer int) (<-chan Event, func()) {
	s := &subscription{ch: make(chan Event, buffer)}
	b.mu.Lock()
	b.subs[s] = struct{}{}
	b.mu.Unlock()

	var once sync.Once
	return s.ch, func() {
		once.Do(func() {
			b.mu.Lock()
			delete(b.subs, s)
			b.mu.Unlock()
			close(s.ch)
		})
	}
}

// Dropped returns how many deliveries were skipped because a subscriber's
// buffer was full.
func (b *Bus) Dropped() uint64 { return b.dropped.Load() }
