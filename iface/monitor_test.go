package iface

import (
	"errors"
	"net/netip"
	"slices"
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

func TestChanges(t *testing.T) {
	wlan := func(index int, up bool, addrs ...string) Interface {
		return Interface{Index: index, Name: "wlan0", Up: up, Carrier: up, Addrs: mustPrefixes(addrs...)}
	}
	snap := func(ifs ...Interface) *Snapshot { return newSnapshot(ifs, nil) }
	eth := Interface{Index: 3, Name: "eth0", Up: true, Carrier: true}

	tests := []struct {
		name     string
		old, cur *Snapshot
		want     []string // "kind interface: detail"
	}{
		{name: "unchanged", old: snap(wlan(2, true, "192.0.2.2/24")), cur: snap(wlan(2, true, "192.0.2.2/24"))},
		{
			name: "down", old: snap(wlan(2, true, "192.0.2.2/24")), cur: snap(wlan(2, false, "192.0.2.2/24")),
			want: []string{"interface_down wlan0: down, addresses [192.0.2.2/24]"},
		},
		{
			name: "up and readdressed", old: snap(wlan(2, false)), cur: snap(wlan(2, true, "192.0.2.2/24")),
			want: []string{"interface_up wlan0: up, addresses [192.0.2.2/24]", "interface_readdressed wlan0: addresses [192.0.2.2/24], gateways []"},
		},
		{
			name: "carrier lost", old: snap(wlan(2, true)), cur: snap(Interface{Index: 2, Name: "wlan0", Up: true}),
			want: []string{"interface_down wlan0: up without carrier, addresses []"},
		},
		{
			name: "added and removed", old: snap(wlan(2, true)), cur: snap(eth),
			want: []string{"interface_added eth0: up, addresses []", "interface_removed wlan0: index 2"},
		},
		{
			name: "re-created", old: snap(wlan(2, true)), cur: snap(wlan(9, true)),
			want: []string{"interface_added wlan0: re-created, index 9 was 2; up, addresses []"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			for _, c := range Changes(tt.old, tt.cur) {
				got = append(got, string(c.Kind)+" "+c.Interface.Name+": "+c.Detail)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("Changes =\n%q\nwant\n%q", got, tt.want)
			}
		})
	}
}
