package iface

import (
	"errors"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// fakeSource is a stateSource whose messages and state the test controls.
type fakeSource struct {
	messages chan error // each value is one receive result
	closed   chan struct{}
	once     sync.Once

	mu    sync.Mutex // protects state, reads
	state *Snapshot
	reads int
}

func newFakeSource(s *Snapshot) *fakeSource {
	return &fakeSource{messages: make(chan error, 16), closed: make(chan struct{}), state: s}
}

func (f *fakeSource) read() (*Snapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reads++
	return f.state, nil
}

func (f *fakeSource) receive() error {
	select {
	case err := <-f.messages:
		return err
	case <-f.closed:
		return errSourceClosed
	}
}

func (f *fakeSource) close() error {
	f.once.Do(func() { close(f.closed) })
	return nil
}

func (f *fakeSource) set(s *Snapshot) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.state = s
}

func (f *fakeSource) readCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reads
}

// newFakeMonitor returns a monitor over a fake source holding s, closed
// when the test ends.
func newFakeMonitor(t *testing.T, s *Snapshot) (*Monitor, *fakeSource) {
	t.Helper()
	logger, _ := newTestLogger(t)
	src := newFakeSource(s)
	m, err := newMonitor(logger, src)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m, src
}

func wlanSnapshot(up bool) *Snapshot {
	return newSnapshot([]Interface{{Index: 2, Name: "wlan0", Up: up, Carrier: up,
		Addrs: mustPrefixes("192.0.2.2/24"), Preferred: mustAddrs("192.0.2.2")}},
		[]defaultRoute{{IfIndex: 2, Gateway: netip.MustParseAddr("192.0.2.1")}})
}

func TestMonitorDebouncesBurst(t *testing.T) {
	first := wlanSnapshot(true)
	m, src := newFakeMonitor(t, first)
	reads := make(chan *Snapshot, 16)
	m.registerReadHook(func(s *Snapshot) { reads <- s })
	changes := make(chan [2]*Snapshot, 16)
	m.RegisterChangeCallback(func(old, new *Snapshot) { changes <- [2]*Snapshot{old, new} })

	second := wlanSnapshot(false)
	src.set(second)
	for range 5 {
		src.messages <- nil
	}

	select {
	case c := <-changes:
		if c[0] != first || c[1] != second {
			t.Errorf("callback got (%p, %p), want (%p, %p)", c[0], c[1], first, second)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("no change reported within 2s")
	}
	<-reads
	if got := m.Snapshot(); got != second {
		t.Errorf("Snapshot() = %p, want the new snapshot %p", got, second)
	}
	// One read at start and one for the whole burst.
	if n := src.readCount(); n != 2 {
		t.Errorf("source read %d times, want 2", n)
	}
}

func TestMonitorSuppressesUnchanged(t *testing.T) {
	m, src := newFakeMonitor(t, wlanSnapshot(true))
	reads := make(chan *Snapshot, 16)
	m.registerReadHook(func(s *Snapshot) { reads <- s })
	var calls int
	var mu sync.Mutex
	m.RegisterChangeCallback(func(old, new *Snapshot) { mu.Lock(); calls++; mu.Unlock() })

	// An equal snapshot in a new value, as every re-read returns.
	src.set(wlanSnapshot(true))
	src.messages <- nil
	select {
	case <-reads:
	case <-time.After(2 * time.Second):
		t.Fatal("no re-read within 2s")
	}
	mu.Lock()
	defer mu.Unlock()
	if calls != 0 {
		t.Errorf("change callback called %d times for an unchanged state, want 0", calls)
	}
}

func TestMonitorReceiveErrorRereads(t *testing.T) {
	logger, logs := newTestLogger(t)
	src := newFakeSource(wlanSnapshot(true))
	m, err := newMonitor(logger, src)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	reads := make(chan *Snapshot, 16)
	m.registerReadHook(func(s *Snapshot) { reads <- s })

	src.messages <- errors.New("netlink receive buffer overrun, messages lost: recvfrom: no buffer space available")
	select {
	case <-reads:
	case <-time.After(2 * time.Second):
		t.Fatal("no re-read within 2s after a receive error")
	}
	if got := logs.matching("level=WARN", "re-reading all state", "no buffer space available"); len(got) != 1 {
		t.Errorf("logged %d matching warnings, want 1", len(got))
	}
}

func TestMonitorUnregisterAndClose(t *testing.T) {
	m, src := newFakeMonitor(t, wlanSnapshot(true))
	called := make(chan struct{}, 1)
	unregister := m.RegisterChangeCallback(func(old, new *Snapshot) { called <- struct{}{} })
	reads := make(chan *Snapshot, 16)
	m.registerReadHook(func(s *Snapshot) { reads <- s })
	unregister()

	src.set(wlanSnapshot(false))
	src.messages <- nil
	<-reads
	select {
	case <-called:
		t.Error("unregistered callback was called")
	default:
	}

	if err := m.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if err := m.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}
