package iface

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"iapd/internal/logkey"
)

// Bursts of kernel messages (a link coming up brings its addresses and
// routes along) are folded into one re-read: it happens debounceQuiet after
// the last message, but no later than debounceMax after the first.
const (
	debounceQuiet = 50 * time.Millisecond
	debounceMax   = 250 * time.Millisecond
	retryRead     = time.Second // wait before re-reading after a failed read
)

// stateSource is the seam between the portable monitor and the kernel.
type stateSource interface {
	// read returns the full current state.
	read() (*Snapshot, error)
	// receive blocks until the kernel reports a change that may matter. An
	// error that is not errSourceClosed is logged and followed by a full
	// re-read, because messages may have been lost.
	receive() error
	// close makes a blocked receive return errSourceClosed.
	close() error
}

var errSourceClosed = errors.New("iface: interface state source closed")

// Monitor watches the kernel's interface, address and route state and
// keeps an immutable Snapshot of it. It is safe for concurrent use; create
// it with NewMonitor.
type Monitor struct {
	logger *slog.Logger
	src    stateSource
	snap   atomic.Pointer[Snapshot]

	kick chan struct{} // a message arrived; capacity 1, so kicks coalesce
	done chan struct{} // closed by Close
	wg   sync.WaitGroup

	mu        sync.Mutex // protects nextID, callbacks, readHooks, closed
	nextID    int
	callbacks map[int]func(old, new *Snapshot)
	readHooks map[int]func(*Snapshot)
	closed    bool
}

// newMonitor starts a monitor over src, which must already be subscribed
// so that no change between the first read and the first receive is lost.
func newMonitor(logger *slog.Logger, src stateSource) (*Monitor, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	s, err := src.read()
	if err != nil {
		src.close()
		return nil, err
	}
	m := &Monitor{
		logger:    logger.With(logkey.Component, "iface.monitor"),
		src:       src,
		kick:      make(chan struct{}, 1),
		done:      make(chan struct{}),
		callbacks: make(map[int]func(old, new *Snapshot)),
		readHooks: make(map[int]func(*Snapshot)),
	}
	m.snap.Store(s)
	m.wg.Add(2)
	go m.receiveLoop()
	go m.refreshLoop()
	return m, nil
}

// Snapshot returns the latest state. It is never nil.
func (m *Monitor) Snapshot() *Snapshot { return m.snap.Load() }

// RegisterChangeCallback arranges for fn to be called with the previous
// and the new snapshot each time the state changes. Calls come from one
// goroutine, in order, and must not block for long or call Close, which
// waits for that goroutine. It returns the function that removes fn.
func (m *Monitor) RegisterChangeCallback(fn func(old, new *Snapshot)) (unregister func()) {
	m.mu.Lock()
	defer m.mu.Unlock()
	id := m.nextID
	m.nextID++
	m.callbacks[id] = fn
	return func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		delete(m.callbacks, id)
	}
}

// registerReadHook arranges for fn to be called after every successful
// re-read, changed or not. The manager uses it because the kernel drops
// iapd's routes on events that can leave the snapshot unchanged, such as a
// link going down and up again within one debounce interval.
func (m *Monitor) registerReadHook(fn func(*Snapshot)) (unregister func()) {
	m.mu.Lock()
	defer m.mu.Unlock()
	id := m.nextID
	m.nextID++
	m.readHooks[id] = fn
	return func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		delete(m.readHooks, id)
	}
}

// Close stops watching. Callbacks are not called after Close returns. It
// is idempotent.
func (m *Monitor) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	m.mu.Unlock()

	close(m.done)
	err := m.src.close()
	m.wg.Wait()
	return err
}

func (m *Monitor) receiveLoop() {
	defer m.wg.Done()
	for {
		err := m.src.receive()
		switch {
		case errors.Is(err, errSourceClosed):
			return
		case err != nil:
			m.logger.Warn("receiving netlink messages failed; re-reading all state", logkey.Err, err)
		}
		select {
		case m.kick <- struct{}{}:
		default:
		}

		// A socket that fails at once every time must not spin.
		if err != nil {
			select {
			case <-m.done:
				return
			case <-time.After(debounceQuiet):
			}
		}
	}
}

func (m *Monitor) refreshLoop() {
	defer m.wg.Done()
	var retry <-chan time.Time
	for {
		select {
		case <-m.done:
			return
		case <-m.kick:
		case <-retry:
		}
		retry = nil
		if !m.settle() {
			return
		}
		if !m.refresh() {
			retry = time.After(retryRead)
		}
	}
}

// settle waits until the burst of messages is over. It returns false when
// the monitor is closed meanwhile.
func (m *Monitor) settle() bool {
	quiet := time.NewTimer(debounceQuiet)
	defer quiet.Stop()
	limit := time.NewTimer(debounceMax)
	defer limit.Stop()
	for {
		select {
		case <-m.done:
			return false
		case <-m.kick:
			quiet.Reset(debounceQuiet)
		case <-quiet.C:
			return true
		case <-limit.C:
			return true
		}
	}
}

// refresh re-reads the state, publishes it when it changed and calls the
// hooks. It returns false when the read failed.
func (m *Monitor) refresh() bool {
	s, err := m.src.read()
	if err != nil {
		m.logger.Warn("reading interface state failed; retrying", logkey.Err, err)
		return false
	}

	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return true
	}
	old := m.snap.Load()
	changed := !old.equal(s)
	if changed {
		m.snap.Store(s)
	}
	callbacks := mapValues(m.callbacks)
	hooks := mapValues(m.readHooks)
	m.mu.Unlock()

	if changed {
		logChanges(m.logger, old, s)
		for _, fn := range callbacks {
			fn(old, s)
		}
	}
	for _, fn := range hooks {
		fn(m.snap.Load())
	}
	return true
}

// mapValues returns the values of m ordered by key, so that callbacks run
// in registration order.
func mapValues[F any](m map[int]F) []F {
	keys := make([]int, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	fns := make([]F, 0, len(keys))
	for _, k := range keys {
		fns = append(fns, m[k])
	}
	return fns
}

// LinkChangeKind is what happened to an interface between two snapshots.
type LinkChangeKind string

// Link change kinds. Their strings are the kinds of iapd's events.
const (
	LinkAdded       LinkChangeKind = "interface_added"
	LinkRemoved     LinkChangeKind = "interface_removed"
	LinkUp          LinkChangeKind = "interface_up"
	LinkDown        LinkChangeKind = "interface_down"
	LinkReaddressed LinkChangeKind = "interface_readdressed"
)

// LinkChange is one change of one interface between two snapshots.
type LinkChange struct {
	Kind      LinkChangeKind
	Interface *Interface // the new state; the old one for LinkRemoved
	Detail    string     // what changed, in words
}

// Changes lists what an operator cares about between old and cur: links
// appearing (a link re-created under the same name counts as added),
// disappearing, going up or down, and changing addresses or default
// gateways. The order is that of cur's interfaces, then the removed ones.
func Changes(old, cur *Snapshot) []LinkChange {
	var changes []LinkChange
	for _, ifc := range cur.Interfaces() {
		prev, ok := old.Interface(ifc.Name)
		switch {
		case !ok:
			changes = append(changes, LinkChange{Kind: LinkAdded, Interface: ifc, Detail: describeLink(ifc)})
			continue
		case prev.Index != ifc.Index:
			detail := fmt.Sprintf("re-created, index %d was %d; %s", ifc.Index, prev.Index, describeLink(ifc))
			changes = append(changes, LinkChange{Kind: LinkAdded, Interface: ifc, Detail: detail})
			continue
		case isRunning(prev) && !isRunning(ifc):
			changes = append(changes, LinkChange{Kind: LinkDown, Interface: ifc, Detail: describeLink(ifc)})
		case !isRunning(prev) && isRunning(ifc):
			changes = append(changes, LinkChange{Kind: LinkUp, Interface: ifc, Detail: describeLink(ifc)})
		}
		if !slices.Equal(prev.Addrs, ifc.Addrs) || !slices.Equal(prev.Preferred, ifc.Preferred) || !slices.Equal(prev.Gateways, ifc.Gateways) {
			detail := fmt.Sprintf("addresses %v, gateways %v", ifc.Addrs, ifc.Gateways)
			changes = append(changes, LinkChange{Kind: LinkReaddressed, Interface: ifc, Detail: detail})
		}
	}
	for _, prev := range old.Interfaces() {
		if _, ok := cur.Interface(prev.Name); !ok {
			changes = append(changes, LinkChange{Kind: LinkRemoved, Interface: prev, Detail: fmt.Sprintf("index %d", prev.Index)})
		}
	}
	return changes
}

// describeLink says whether ifc is up and has carrier, and its addresses.
func describeLink(ifc *Interface) string {
	state := "down"
	switch {
	case ifc.Up && ifc.Carrier:
		state = "up"
	case ifc.Up:
		state = "up without carrier"
	}
	return fmt.Sprintf("%s, addresses %v", state, ifc.Addrs)
}

// logChanges logs the changes between two snapshots at Debug. The daemon
// publishes them as events, which it logs at Info.
func logChanges(logger *slog.Logger, old, cur *Snapshot) {
	if !logger.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	for _, c := range Changes(old, cur) {
		logger.Debug("link changed", "kind", string(c.Kind), logkey.Interface, c.Interface.Name,
			logkey.IfIndex, c.Interface.Index, "detail", c.Detail)
	}
}

func isRunning(ifc *Interface) bool { return ifc.Up && ifc.Carrier }
