package cli

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"iapd/admin"
	"iapd/dns"
	"iapd/iface"
	"iapd/internal/event"
	"iapd/policy"
	"iapd/proxy"
)

// fakeHealth holds the statuses a test sets.
type fakeHealth struct {
	mu       sync.Mutex
	statuses map[*policy.AccessPoint]policy.Status
}

func (f *fakeHealth) Status(ap *policy.AccessPoint) policy.Status {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.statuses[ap]
}

// set changes ap's status and returns the change, as Health reports it.
func (f *fakeHealth) set(ap *policy.AccessPoint, st policy.Status) iface.Change {
	f.mu.Lock()
	defer f.mu.Unlock()
	old := f.statuses[ap]
	f.statuses[ap] = st
	return iface.Change{AccessPoint: ap, Old: old, New: st}
}

// fakeConns is a connection table that records what the supervisor closed.
type fakeConns struct {
	mu    sync.Mutex
	open  []proxy.ConnInfo
	close []proxy.ConnInfo
}

func (f *fakeConns) closeConns(match func(proxy.ConnInfo) bool) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	var keep []proxy.ConnInfo
	n := 0
	for _, c := range f.open {
		if match(c) {
			f.close = append(f.close, c)
			n++
			continue
		}
		keep = append(keep, c)
	}
	f.open = keep
	return n
}

func (f *fakeConns) closed() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, c := range f.close {
		out = append(out, c.Destination+"/"+c.AccessPoint)
	}
	return out
}

// recvEvents reads n events from ch, failing the test after two seconds,
// and returns them as "kind key=value ...".
func recvEvents(t *testing.T, ch <-chan event.Event, n int) []string {
	t.Helper()
	var got []string
	for range n {
		select {
		case e := <-ch:
			s := string(e.Kind)
			for _, kv := range [][2]string{{"interface", e.Interface}, {"access_point", e.AccessPoint}, {"destination", e.Destination},
				{"from", e.From}, {"to", e.To}, {"reason", e.Reason}} {
				if kv[1] != "" {
					s += " " + kv[0] + "=" + kv[1]
				}
			}
			if e.Count > 0 {
				s += fmt.Sprintf(" count=%d", e.Count)
			}
			got = append(got, s)
		case <-time.After(2 * time.Second):
			t.Fatalf("got %d events, want %d: %q", len(got), n, got)
		}
	}
	return got
}

func TestSupervisorFailoverAndFailBack(t *testing.T) {
	pol, err := policy.Parse("supervise.yaml", []byte(`
listeners:
  - listen: "127.0.0.1:0"
    app: browser
apps:
  browser: {destination: internet}
  sync: {destination: patient}
access_points:
  wifi: {interface: wlan0, dns: [192.0.2.53]}
  cell: {interface: wwan0, dns: [198.51.100.53]}
destinations:
  internet: {access_points: [wifi, cell], hold_down: 200ms, on_better: close}
  patient: {access_points: [wifi, cell], hold_down: 200ms, on_lost: keep}
`))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	wifi, cell := pol.AccessPoints["wifi"], pol.AccessPoints["cell"]
	usable := func(name string) policy.Status {
		return policy.Status{Usable: true, IPv4: true, Link: policy.Link{Interface: name}}
	}
	health := &fakeHealth{statuses: map[*policy.AccessPoint]policy.Status{wifi: usable("wlan0"), cell: usable("wwan0")}}
	conns := &fakeConns{open: []proxy.ConnInfo{
		{Destination: "internet", AccessPoint: "wifi"},
		{Destination: "patient", AccessPoint: "wifi"},
		{Destination: "internet", AccessPoint: "cell"},
	}}
	var logs bytes.Buffer
	var logMu sync.Mutex
	logger := slog.New(slog.NewTextHandler(lockedWriter{&logs, &logMu}, nil))
	bus := event.NewBus()
	ch, unsubscribe := bus.Subscribe(32)
	defer unsubscribe()

	conds := newConditions(pol, health, nil)
	watcher := admin.NewWatcher(bus, nil, func() *policy.Policy { return pol }, logger)
	sv := newSupervisor(pol, watcher.Publish, func() *conditions { return conds }, conns.closeConns)
	defer sv.stop()
	sv.evaluate()
	if got := conds.Current(pol.Destinations["internet"]); got != wifi {
		t.Fatalf("internet prefers %v at start, want wifi", got)
	}

	// wifi is lost: internet closes its connection over wifi, patient
	// keeps its own, and both switch to cell.
	down := policy.Status{Reason: "interface wlan0 is down", Link: policy.Link{Interface: "wlan0"}}
	sv.accessPointChanged(health.set(wifi, down))
	want := []string{
		"access_point_unusable interface=wlan0 access_point=wifi reason=interface wlan0 is down",
		"connections_closed access_point=wifi destination=internet reason=access point lost: interface wlan0 is down count=1",
		"destination_switched destination=internet from=wifi to=cell reason=first usable in the destination's order",
		"destination_switched destination=patient from=wifi to=cell reason=first usable in the destination's order",
	}
	if got := recvEvents(t, ch, len(want)); !slices.Equal(got, want) {
		t.Errorf("events when wifi was lost:\n%q\nwant\n%q", got, want)
	}
	if got := conns.closed(); !slices.Equal(got, []string{"internet/wifi"}) {
		t.Errorf("closed %q, want [internet/wifi]", got)
	}

	// wifi comes back: new connections stay on cell until the hold-down
	// ends, then go back, and internet closes its connection over cell.
	back := usable("wlan0")
	back.Since = time.Now()
	sv.accessPointChanged(health.set(wifi, back))
	if got := recvEvents(t, ch, 1); got[0] != "access_point_usable interface=wlan0 access_point=wifi" {
		t.Errorf("event when wifi came back = %q", got[0])
	}
	if got := conds.Current(pol.Destinations["internet"]); got != cell {
		t.Errorf("internet prefers %v during the hold-down, want cell", got)
	}
	want = []string{
		"destination_switched destination=internet from=cell to=wifi reason=first usable in the destination's order",
		"connections_closed access_point=cell destination=internet reason=better access point wifi is usable again count=1",
		"destination_switched destination=patient from=cell to=wifi reason=first usable in the destination's order",
	}
	if got := recvEvents(t, ch, len(want)); !slices.Equal(got, want) {
		t.Errorf("events after the hold-down:\n%q\nwant\n%q", got, want)
	}
	if waited := time.Since(back.Since); waited < 200*time.Millisecond {
		t.Errorf("fail-back %v after wifi came back, want after the hold-down of 200ms", waited)
	}
	if got := conns.closed(); !slices.Equal(got, []string{"internet/wifi", "internet/cell"}) {
		t.Errorf("closed %q, want [internet/wifi internet/cell]", got)
	}

	// Nothing is usable: the destinations switch to none, with the reason.
	sv.accessPointChanged(health.set(cell, policy.Status{Reason: "probe failed: timeout", Link: policy.Link{Interface: "wwan0"}}))
	sv.accessPointChanged(health.set(wifi, down))
	want = []string{
		"access_point_unusable interface=wwan0 access_point=cell reason=probe failed: timeout",
		"access_point_unusable interface=wlan0 access_point=wifi reason=interface wlan0 is down",
		`destination_switched destination=internet from=wifi reason=destination "internet": policy: no usable access point (wifi: interface wlan0 is down; cell: probe failed: timeout)`,
		`destination_switched destination=patient from=wifi reason=destination "patient": policy: no usable access point (wifi: interface wlan0 is down; cell: probe failed: timeout)`,
	}
	if got := recvEvents(t, ch, len(want)); !slices.Equal(got, want) {
		t.Errorf("events when nothing is usable:\n%q\nwant\n%q", got, want)
	}

	logMu.Lock()
	defer logMu.Unlock()
	for _, msg := range []string{"msg=access_point_unusable", "msg=destination_switched", "msg=connections_closed", "msg=access_point_usable"} {
		if !strings.Contains(logs.String(), "level=INFO "+msg) {
			t.Errorf("log lacks an Info record %s:\n%s", msg, logs.String())
		}
	}
}

// lockedWriter serializes writes to a buffer that the test reads.
type lockedWriter struct {
	buf *bytes.Buffer
	mu  *sync.Mutex
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(p)
}

func TestIsAccessPointFailure(t *testing.T) {
	timeout := &net.OpError{Op: "dial", Net: "tcp", Err: os.ErrDeadlineExceeded}
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{name: "connected", err: nil},
		{name: "refused by the target", err: &net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}},
		{name: "name not found", err: &dns.Error{Name: "x.test", Err: dns.ErrNotFound}},
		{name: "invalid name", err: &dns.Error{Name: "x..test", Err: dns.ErrInvalidName}},
		{name: "dns servers silent", err: &dns.Error{Name: "x.test", Err: dns.ErrNoAnswer}, want: true},
		{name: "network unreachable", err: &net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ENETUNREACH)}, want: true},
		{name: "host unreachable", err: &net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.EHOSTUNREACH)}, want: true},
		{name: "no route in iapd's table", err: fmt.Errorf("dialing: %w", iface.ErrNoRoute), want: true},
		{name: "socket timeout", err: timeout, want: true},
		{name: "deadline of the attempt", err: fmt.Errorf("connecting: %w", context.DeadlineExceeded), want: true},
		{name: "other", err: errors.New("connection reset by peer")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := isAccessPointFailure(tt.err); got != tt.want {
				t.Errorf("isAccessPointFailure(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}
