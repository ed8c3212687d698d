package iface

import (
	"bytes"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"iapd/policy"
)

func TestMain(m *testing.M) {
	if helper := os.Getenv(helperEnv); helper != "" {
		os.Exit(runHelper(helper))
	}
	code := m.Run()
	if code == 0 {
		if leaked := leakedGoroutines(2 * time.Second); leaked != "" {
			fmt.Fprintf(os.Stderr, "goroutines of package iface still running after the tests:\n%s\n", leaked)
			code = 1
		}
	}
	os.Exit(code)
}

// leakedGoroutines waits up to timeout for every goroutine running code of
// this package, other than the caller, to end, and returns the stacks of
// those that did not.
func leakedGoroutines(timeout time.Duration) string {
	deadline := time.Now().Add(timeout)
	for {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		var leaked []string
		// The first stack is the caller's own.
		for _, g := range strings.Split(string(buf), "\n\n")[1:] {
			if strings.Contains(g, "iapd/iface.") {
				leaked = append(leaked, g)
			}
		}
		if len(leaked) == 0 || time.Now().After(deadline) {
			return strings.Join(leaked, "\n\n")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// logRecorder is a slog destination that writes each line through t.Log
// and keeps it, so tests can assert on warnings.
type logRecorder struct {
	t     testing.TB
	mu    sync.Mutex
	lines []string
	done  bool // the test has finished; t.Log would panic
}

func newTestLogger(t testing.TB) (*slog.Logger, *logRecorder) {
	r := &logRecorder{t: t}
	t.Cleanup(func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.done = true
	})
	return slog.New(slog.NewTextHandler(r, &slog.HandlerOptions{Level: slog.LevelDebug})), r
}

func (r *logRecorder) Write(p []byte) (int, error) {
	line := string(bytes.TrimRight(p, "\n"))
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lines = append(r.lines, line)
	if !r.done {
		r.t.Log(line)
	}
	return len(p), nil
}

// matching returns the logged lines that contain every one of parts.
func (r *logRecorder) matching(parts ...string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var found []string
next:
	for _, l := range r.lines {
		for _, p := range parts {
			if !strings.Contains(l, p) {
				continue next
			}
		}
		found = append(found, l)
	}
	return found
}

func mustPrefixes(ss ...string) []netip.Prefix {
	var ps []netip.Prefix
	for _, s := range ss {
		ps = append(ps, netip.MustParsePrefix(s))
	}
	return ps
}

func mustAddrs(ss ...string) []netip.Addr {
	var as []netip.Addr
	for _, s := range ss {
		as = append(as, netip.MustParseAddr(s))
	}
	return as
}

// testPolicy returns a policy with the default routing numbers and aps in
// order.
func testPolicy(aps ...*policy.AccessPoint) *policy.Policy {
	p := &policy.Policy{
		AccessPoints: make(map[string]*policy.AccessPoint),
		Routing:      policy.Routing{Table: 18100, Mark: 0x1a900, RulePriority: 18100},
	}
	for i, ap := range aps {
		ap.Index = i
		p.AccessPoints[ap.Name] = ap
		p.AccessPointOrder = append(p.AccessPointOrder, ap)
	}
	return p
}

func TestSnapshotUsable(t *testing.T) {
	s := newSnapshot([]Interface{
		{Index: 1, Name: "lo", Up: true, Carrier: true, Loopback: true, Addrs: mustPrefixes("127.0.0.1/8")},
		{Index: 2, Name: "wlan0", Up: true, Carrier: true, Addrs: mustPrefixes("192.0.2.2/24"), Preferred: mustAddrs("192.0.2.2"), OnLink: mustPrefixes("192.0.2.0/24")},
		{Index: 3, Name: "cell", Up: false, Carrier: false},
		{Index: 4, Name: "eth0", Up: true, Carrier: false, Addrs: mustPrefixes("198.51.100.2/24"), Preferred: mustAddrs("198.51.100.2")},
		{Index: 5, Name: "wg0", Up: true, Carrier: true, PointToPoint: true, Addrs: mustPrefixes("fe80::1/64")},
		{Index: 6, Name: "v6only", Up: true, Carrier: true, Addrs: mustPrefixes("2001:db8::2/64"), Preferred: mustAddrs("2001:db8::2"), OnLink: mustPrefixes("2001:db8::/64", "fe80::/64")},
		{Index: 7, Name: "lonely", Up: true, Carrier: true, Addrs: mustPrefixes("203.0.113.7/32", "fe80::7/64"), Preferred: mustAddrs("203.0.113.7"), OnLink: mustPrefixes("fe80::/64")},
	}, []defaultRoute{{IfIndex: 2, Gateway: netip.MustParseAddr("192.0.2.1"), Metric: 600}})
	noDefault := newSnapshot([]Interface{{Index: 2, Name: "wlan0", Up: true, Carrier: true}}, nil)
	v6Default := newSnapshot([]Interface{{Index: 6, Name: "v6only", Up: true, Carrier: true}},
		[]defaultRoute{{IfIndex: 6, Gateway: netip.MustParseAddr("fe80::1"), V6: true}})

	tests := []struct {
		name       string
		snapshot   *Snapshot
		ap         *policy.AccessPoint
		wantOK     bool
		wantReason string
	}{
		{name: "default with IPv4 default route", snapshot: s, ap: &policy.AccessPoint{Interface: "default"}, wantOK: true},
		{name: "default with IPv6 default route", snapshot: v6Default, ap: &policy.AccessPoint{Interface: "default"}, wantOK: true},
		{name: "default without default route", snapshot: noDefault, ap: &policy.AccessPoint{Interface: "default"}, wantReason: "no default route"},
		{name: "default on nil snapshot", snapshot: nil, ap: &policy.AccessPoint{Interface: "default"}, wantReason: "no default route"},
		{name: "interface up with address", snapshot: s, ap: &policy.AccessPoint{Interface: "wlan0"}, wantOK: true},
		{name: "interface missing", snapshot: s, ap: &policy.AccessPoint{Interface: "wwan0"}, wantReason: "interface wwan0 not found"},
		{name: "interface down", snapshot: s, ap: &policy.AccessPoint{Interface: "cell"}, wantReason: "interface cell is down"},
		{name: "interface without carrier", snapshot: s, ap: &policy.AccessPoint{Interface: "eth0"}, wantReason: "interface eth0 has no carrier"},
		{name: "only link-local address", snapshot: s, ap: &policy.AccessPoint{Interface: "wg0"}, wantReason: "interface wg0 has no address"},
		{name: "configured source without address", snapshot: s, ap: &policy.AccessPoint{Interface: "wg0", Sources: mustAddrs("10.0.0.2")}, wantOK: true},
		{name: "IPv6 address only", snapshot: s, ap: &policy.AccessPoint{Interface: "v6only"}, wantOK: true},
		{name: "address without route", snapshot: s, ap: &policy.AccessPoint{Interface: "lonely"}, wantReason: "interface lonely has no route"},
		{name: "address with gateway from policy", snapshot: s, ap: &policy.AccessPoint{Interface: "lonely", Gateways: mustAddrs("203.0.113.1")}, wantOK: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ok, reason := tt.snapshot.Usable(tt.ap)
			if ok != tt.wantOK {
				t.Errorf("Usable = %v, want %v", ok, tt.wantOK)
			}
			if reason != tt.wantReason {
				t.Errorf("reason = %q, want %q", reason, tt.wantReason)
			}
		})
	}
}

func TestSnapshotFamilies(t *testing.T) {
	s := newSnapshot([]Interface{
		{Index: 2, Name: "wlan0", Up: true, Carrier: true, Addrs: mustPrefixes("192.0.2.2/24", "2001:db8::2/64"), Preferred: mustAddrs("192.0.2.2", "2001:db8::2"), OnLink: mustPrefixes("192.0.2.0/24", "2001:db8::/64")},
		{Index: 3, Name: "cell", Up: true, Carrier: true, Addrs: mustPrefixes("198.51.100.2/32"), Preferred: mustAddrs("198.51.100.2")},
		{Index: 4, Name: "tun0", Up: true, Carrier: true, PointToPoint: true, Addrs: mustPrefixes("10.8.0.2/32"), Preferred: mustAddrs("10.8.0.2")},
		{Index: 5, Name: "down0", Up: false, Addrs: mustPrefixes("203.0.113.2/24"), Preferred: mustAddrs("203.0.113.2"), OnLink: mustPrefixes("203.0.113.0/24")},
	}, []defaultRoute{{IfIndex: 3, Gateway: netip.MustParseAddr("198.51.100.1"), Metric: 600}})
	v6Default := newSnapshot([]Interface{{Index: 6, Name: "v6only", Up: true, Carrier: true}},
		[]defaultRoute{{IfIndex: 6, Gateway: netip.MustParseAddr("fe80::1"), V6: true}})

	tests := []struct {
		name     string
		snapshot *Snapshot
		ap       *policy.AccessPoint
		v4, v6   bool
	}{
		{name: "both families on attached networks", snapshot: s, ap: &policy.AccessPoint{Interface: "wlan0"}, v4: true, v6: true},
		{name: "IPv4 by main-table gateway", snapshot: s, ap: &policy.AccessPoint{Interface: "cell"}, v4: true},
		{name: "policy gateway without address of its family", snapshot: s, ap: &policy.AccessPoint{Interface: "cell", Gateways: mustAddrs("2001:db8::1")}, v4: true},
		{name: "policy source and gateway", snapshot: s, ap: &policy.AccessPoint{Interface: "cell", Sources: mustAddrs("2001:db8::9"), Gateways: mustAddrs("2001:db8::1")}, v4: true, v6: true},
		{name: "point-to-point", snapshot: s, ap: &policy.AccessPoint{Interface: "tun0"}, v4: true},
		{name: "link state is not looked at", snapshot: s, ap: &policy.AccessPoint{Interface: "down0"}, v4: true},
		{name: "missing interface", snapshot: s, ap: &policy.AccessPoint{Interface: "wwan0"}},
		{name: "default IPv4", snapshot: s, ap: &policy.AccessPoint{Interface: "default"}, v4: true},
		{name: "default IPv6", snapshot: v6Default, ap: &policy.AccessPoint{Interface: "default"}, v6: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v4, v6 := tt.snapshot.Families(tt.ap)
			if v4 != tt.v4 || v6 != tt.v6 {
				t.Errorf("Families = %v, %v, want %v, %v", v4, v6, tt.v4, tt.v6)
			}
		})
	}
}

func TestSnapshotDefault(t *testing.T) {
	s := newSnapshot([]Interface{
		{Index: 3, Name: "cell", Up: true},
		{Index: 2, Name: "wlan0", Up: true},
		{Index: 7, Name: "wg0", Up: true, PointToPoint: true},
	}, []defaultRoute{
		{IfIndex: 3, Gateway: netip.MustParseAddr("198.51.100.1"), Metric: 700},
		{IfIndex: 2, Gateway: netip.MustParseAddr("192.0.2.1"), Metric: 600},
		{IfIndex: 3, Gateway: netip.MustParseAddr("fe80::1"), Metric: 1024, V6: true},
		{IfIndex: 7, Metric: 50, V6: true},
		{IfIndex: 99, Gateway: netip.MustParseAddr("203.0.113.1"), Metric: 1}, // link gone between dumps
	})

	tests := []struct {
		name   string
		v6     bool
		wantIf string
		wantGw string
	}{
		{name: "IPv4 lowest metric", v6: false, wantIf: "wlan0", wantGw: "192.0.2.1"},
		{name: "IPv6 point-to-point without gateway", v6: true, wantIf: "wg0", wantGw: "invalid IP"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ifc, gw, ok := s.Default(tt.v6)
			if !ok {
				t.Fatal("Default found no route")
			}
			if ifc.Name != tt.wantIf {
				t.Errorf("interface = %s, want %s", ifc.Name, tt.wantIf)
			}
			if gw.String() != tt.wantGw {
				t.Errorf("gateway = %s, want %s", gw, tt.wantGw)
			}
		})
	}

	cell, _ := s.Interface("cell")
	if got, want := fmt.Sprint(cell.Gateways), "[198.51.100.1 fe80::1]"; got != want {
		t.Errorf("cell gateways = %s, want %s", got, want)
	}
	if names := fmt.Sprint(interfaceNames(s)); names != "[wlan0 cell wg0]" {
		t.Errorf("interfaces in index order = %s, want [wlan0 cell wg0]", names)
	}
	if ifc, ok := s.ByIndex(7); !ok || ifc.Name != "wg0" {
		t.Errorf("ByIndex(7) = %v, %v, want wg0", ifc, ok)
	}
}

func interfaceNames(s *Snapshot) []string {
	var names []string
	for _, ifc := range s.Interfaces() {
		names = append(names, ifc.Name)
	}
	return names
}

func TestSnapshotEqual(t *testing.T) {
	base := func() []Interface {
		return []Interface{{Index: 2, Name: "wlan0", Up: true, Carrier: true, Addrs: mustPrefixes("192.0.2.2/24"), Preferred: mustAddrs("192.0.2.2")}}
	}
	gw := []defaultRoute{{IfIndex: 2, Gateway: netip.MustParseAddr("192.0.2.1")}}

	tests := []struct {
		name   string
		change func(ifs []Interface) []defaultRoute
		want   bool
	}{
		{name: "same state", change: func([]Interface) []defaultRoute { return gw }, want: true},
		{name: "link down", change: func(ifs []Interface) []defaultRoute { ifs[0].Up = false; return gw }},
		{name: "new index", change: func(ifs []Interface) []defaultRoute { ifs[0].Index = 9; return nil }},
		{name: "address added", change: func(ifs []Interface) []defaultRoute {
			ifs[0].Addrs = append(ifs[0].Addrs, netip.MustParsePrefix("2001:db8::2/64"))
			return gw
		}},
		{name: "default route gone", change: func([]Interface) []defaultRoute { return nil }},
	}
	old := newSnapshot(base(), gw)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ifs := base()
			routes := tt.change(ifs)
			if got := old.equal(newSnapshot(ifs, routes)); got != tt.want {
				t.Errorf("equal = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestSnapshotHasAddr(t *testing.T) {
	s := newSnapshot([]Interface{
		{Index: 1, Name: "lo", Up: true, Loopback: true, Addrs: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/8"), netip.MustParsePrefix("::1/128")}},
		{Index: 2, Name: "wlan0", Up: true, Addrs: []netip.Prefix{netip.MustParsePrefix("192.0.2.10/24"), netip.MustParsePrefix("fe80::1/64")}},
	}, nil)
	tests := []struct {
		name string
		addr string
		want bool
	}{
		{name: "own ipv4", addr: "192.0.2.10", want: true},
		{name: "own ipv4 mapped", addr: "::ffff:192.0.2.10", want: true},
		{name: "same network other host", addr: "192.0.2.11", want: false},
		{name: "link-local without zone", addr: "fe80::1", want: true},
		{name: "link-local other zone", addr: "fe80::1%eth9", want: true},
		{name: "loopback listed", addr: "::1", want: true},
		{name: "loopback not listed", addr: "127.0.0.2", want: false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := s.HasAddr(netip.MustParseAddr(tt.addr)); got != tt.want {
				t.Errorf("HasAddr(%s) = %v, want %v", tt.addr, got, tt.want)
			}
		})
	}
	var none *Snapshot
	if none.HasAddr(netip.MustParseAddr("192.0.2.10")) {
		t.Errorf("nil snapshot HasAddr = true, want false")
	}
}
