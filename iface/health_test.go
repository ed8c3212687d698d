package iface

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"iapd/policy"
)

// fakeRoutes is a routeKeeper whose readiness the test sets.
type fakeRoutes struct {
	mu      sync.Mutex
	missing map[*policy.AccessPoint]bool
}

func (f *fakeRoutes) reconcile(*Snapshot)                                     {}
func (f *fakeRoutes) update([]*policy.AccessPoint, map[string]int, *Snapshot) {}
func (f *fakeRoutes) removeAll() error                                        { return nil }
func (f *fakeRoutes) isReady(ap *policy.AccessPoint) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return !f.missing[ap]
}

func (f *fakeRoutes) setMissing(ap *policy.AccessPoint, missing bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.missing[ap] = missing
}

// healthBed is a Health over a fake monitor and routing tables.
type healthBed struct {
	h       *Health
	mgr     *Manager
	src     *fakeSource
	routes  *fakeRoutes
	mu      sync.Mutex // protects changes
	changes []Change
}

func newHealthBed(t *testing.T, p *policy.Policy, s *Snapshot, cfg HealthConfig) *healthBed {
	t.Helper()
	m, src := newFakeMonitor(t, s)
	b := &healthBed{src: src, routes: &fakeRoutes{missing: map[*policy.AccessPoint]bool{}}}
	logger, _ := newTestLogger(t)
	cfg.Policy = p
	cfg.Manager = &Manager{monitor: m, routes: b.routes}
	cfg.Manager.dialers.Store(&dialerSet{cur: newDialers(p, assignSlots(p, nil), m, cfg.Manager.RoutesReady)})
	b.mgr = cfg.Manager
	cfg.Logger = logger
	b.h = NewHealth(cfg)
	b.h.RegisterChangeCallback(func(c Change) {
		b.mu.Lock()
		b.changes = append(b.changes, c)
		b.mu.Unlock()
	})
	t.Cleanup(func() { b.h.Close() })
	return b
}

// setState makes the fake monitor re-read s, as after a kernel message.
func (b *healthBed) setState(s *Snapshot) {
	b.src.set(s)
	b.src.messages <- nil
}

// usableFlips returns "+name" or "-name" for each change of usability seen.
func (b *healthBed) usableFlips() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var flips []string
	for _, c := range b.changes {
		if !c.UsableChanged() {
			continue
		}
		sign := "-"
		if c.New.Usable {
			sign = "+"
		}
		flips = append(flips, sign+c.AccessPoint.Name)
	}
	return flips
}

// waitStatus waits until ap's status meets cond, or fails the test after
// three seconds.
func waitStatus(t *testing.T, h *Health, ap *policy.AccessPoint, what string, cond func(policy.Status) bool) policy.Status {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		st := h.Status(ap)
		if cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %s of %s: not seen within 3s; status %+v", what, ap.Name, st)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func isUsable(st policy.Status) bool    { return st.Usable }
func isNotUsable(st policy.Status) bool { return !st.Usable }

// listenTCP listens on loopback and accepts and closes connections until
// the returned function closes the listener.
func listenTCP(t *testing.T, addr string) (string, func()) {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listening: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			ln.Close()
			<-done
		})
	}
	t.Cleanup(stop)
	return ln.Addr().String(), stop
}

func TestHealthFollowsLinkAndRoutes(t *testing.T) {
	wifi := &policy.AccessPoint{Name: "wifi", Interface: "wlan0"}
	host := &policy.AccessPoint{Name: "host", Interface: policy.DefaultInterface}
	p := testPolicy(wifi, host)
	p.Interfaces = map[string]*policy.Link{"wlan0": {Interface: "wlan0", Type: policy.LinkWifi, Cost: 3}}
	b := newHealthBed(t, p, wlanSnapshot(true), HealthConfig{})

	st := b.h.Status(wifi)
	if !st.Usable || st.Reason != "" || !st.IPv4 || st.IPv6 || !st.Since.IsZero() || st.Probe != "" {
		t.Errorf("wifi at start = %+v, want usable for IPv4, since start, without probe", st)
	}
	if want := (policy.Link{Interface: "wlan0", Type: policy.LinkWifi, Cost: 3}); st.Link != want {
		t.Errorf("wifi link = %+v, want %+v", st.Link, want)
	}
	// interface: default takes the facts of the interface that holds the
	// default route.
	if st := b.h.Status(host); !st.Usable || st.Link.Interface != "wlan0" || st.Link.Type != policy.LinkWifi {
		t.Errorf("host = %+v, want usable through wlan0 with its facts", st)
	}

	b.routes.setMissing(wifi, true)
	b.setState(wlanSnapshot(true))
	st = waitStatus(t, b.h, wifi, "missing routes", isNotUsable)
	if want := "routing table of interface wlan0 is not installed yet"; st.Reason != want {
		t.Errorf("reason = %q, want %q", st.Reason, want)
	}

	b.routes.setMissing(wifi, false)
	b.setState(wlanSnapshot(false))
	st = waitStatus(t, b.h, wifi, "link down", func(st policy.Status) bool { return st.Reason == "interface wlan0 is down" })
	if st.Usable {
		t.Errorf("wifi usable with its link down")
	}

	before := time.Now()
	b.setState(wlanSnapshot(true))
	st = waitStatus(t, b.h, wifi, "link back", isUsable)
	if st.Since.Before(before) {
		t.Errorf("since = %v, want the time it came back (after %v), which starts the hold-down", st.Since, before)
	}
	if got, want := strings.Join(b.usableFlips(), " "), "-wifi +wifi"; !strings.HasPrefix(got, want) {
		t.Errorf("usable flips = %q, want %q first", got, want)
	}

	unknown := &policy.AccessPoint{Name: "stranger", Interface: "wlan0"}
	if st := b.h.Status(unknown); st.Usable || st.Reason != `access point "stranger" is not in the policy` {
		t.Errorf("status of an access point outside the policy = %+v", st)
	}
}

func TestHealthTCPProbe(t *testing.T) {
	addr, stop := listenTCP(t, "127.0.0.1:0")
	wifi := &policy.AccessPoint{Name: "wifi", Interface: "wlan0", Probe: &policy.Probe{
		Kind: policy.ProbeTCP, Target: addr, Interval: 30 * time.Millisecond, Timeout: time.Second,
		Failures: 2, Successes: 2, DialFailures: 2,
	}}
	b := newHealthBed(t, testPolicy(wifi), wlanSnapshot(true), HealthConfig{})

	st := waitStatus(t, b.h, wifi, "first pass", isUsable)
	if !st.Since.IsZero() {
		t.Errorf("since = %v after the first pass, want zero: no hold-down before it was ever usable", st.Since)
	}
	if st.Latency <= 0 {
		t.Errorf("latency = %v, want the connect time", st.Latency)
	}
	if want := "tcp " + addr + " every 30ms: passed, "; !strings.HasPrefix(st.Probe, want) {
		t.Errorf("probe = %q, want prefix %q", st.Probe, want)
	}

	stop()
	st = waitStatus(t, b.h, wifi, "failures", isNotUsable)
	if want := "probe failed: dial tcp " + addr + ": connect: connection refused"; st.Reason != want {
		t.Errorf("reason = %q, want %q", st.Reason, want)
	}
	if st.Latency != 0 {
		t.Errorf("latency = %v while failing, want 0", st.Latency)
	}

	before := time.Now()
	listenTCP(t, addr)
	st = waitStatus(t, b.h, wifi, "recovery", isUsable)
	if st.Since.Before(before) {
		t.Errorf("since = %v, want the time it recovered (after %v)", st.Since, before)
	}
	if got, want := strings.Join(b.usableFlips(), " "), "+wifi -wifi +wifi"; got != want {
		t.Errorf("usable flips = %q, want %q", got, want)
	}
}

func TestHealthDialFailures(t *testing.T) {
	addr, _ := listenTCP(t, "127.0.0.1:0")
	wifi := &policy.AccessPoint{Name: "wifi", Interface: "wlan0", Probe: &policy.Probe{
		// A long interval keeps the probe from bringing it back during
		// the test, until the test kicks it.
		Kind: policy.ProbeTCP, Target: addr, Interval: time.Hour, Timeout: time.Second,
		Failures: 3, Successes: 1, DialFailures: 2,
	}}
	b := newHealthBed(t, testPolicy(wifi), wlanSnapshot(true), HealthConfig{})
	waitStatus(t, b.h, wifi, "first pass", isUsable)

	boom := errors.New("connect: no route to host")
	b.h.DialFailed(wifi, boom)
	b.h.DialSucceeded(wifi)
	b.h.DialFailed(wifi, boom)
	if st := b.h.Status(wifi); !st.Usable {
		t.Fatalf("unusable after failures that a success interrupted: %+v", st)
	}

	// The second failure in a row takes it down and probes again at once,
	// and the pass (one is enough here) brings it back.
	// The change callbacks run after DialFailed returns, so wait for the
	// flips themselves rather than for the status.
	b.h.DialFailed(wifi, boom)
	deadline := time.Now().Add(5 * time.Second)
	want := "+wifi -wifi +wifi"
	got := strings.Join(b.usableFlips(), " ")
	for got != want && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
		got = strings.Join(b.usableFlips(), " ")
	}
	if got != want {
		t.Errorf("usable flips = %q, want %q", got, want)
	}
	b.mu.Lock()
	var down string
	for _, c := range b.changes {
		if c.UsableChanged() && !c.New.Usable {
			down = c.New.Reason
		}
	}
	b.mu.Unlock()
	if want := "2 dials in a row failed: connect: no route to host"; down != want {
		t.Errorf("reason when taken down = %q, want %q", down, want)
	}

	noProbe := &policy.AccessPoint{Name: "cell", Interface: "wlan0"}
	b2 := newHealthBed(t, testPolicy(noProbe), wlanSnapshot(true), HealthConfig{})
	for range 5 {
		b2.h.DialFailed(noProbe, boom)
	}
	if st := b2.h.Status(noProbe); !st.Usable {
		t.Errorf("access point without probe taken down by dial failures: %+v", st)
	}
}

func TestHealthHTTPAndDNSProbes(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("/generate_204", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	mux.HandleFunc("/portal", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/generate_204", http.StatusFound)
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	port := ln.Addr().(*net.TCPAddr).Port
	base := fmt.Sprintf("http://127.0.0.1:%d", port)

	resolve := func(ctx context.Context, ap *policy.AccessPoint, host string) ([]netip.Addr, error) {
		if host == "check.test" {
			return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
		}
		return nil, fmt.Errorf("resolving %q via access point %q: dns: name not found", host, ap.Name)
	}
	query := func(ctx context.Context, ap *policy.AccessPoint, host string) ([]netip.Addr, error) {
		switch host {
		case "up.test":
			return []netip.Addr{netip.MustParseAddr("192.0.2.1")}, nil
		case "empty.test":
			return nil, nil
		}
		return nil, errors.New("dns: no server answered")
	}

	tests := []struct {
		name       string
		kind       policy.ProbeKind
		target     string
		status     int
		wantUsable bool
		wantReason string
	}{
		{name: "http expected status", kind: policy.ProbeHTTP, target: base + "/generate_204", status: 204, wantUsable: true},
		{name: "http name by access point resolver", kind: policy.ProbeHTTP, target: fmt.Sprintf("http://check.test:%d/generate_204", port), status: 204, wantUsable: true},
		{
			name: "http redirect of a captive portal", kind: policy.ProbeHTTP, target: base + "/portal", status: 204,
			wantReason: "probe has not passed yet: GET " + base + "/portal: status 302, want 204",
		},
		{
			name: "http unknown name", kind: policy.ProbeHTTP, target: fmt.Sprintf("http://nowhere.test:%d/", port), status: 200,
			wantReason: `probe has not passed yet: Get "` + fmt.Sprintf("http://nowhere.test:%d/", port) + `": resolving "nowhere.test" via access point "wifi": dns: name not found`,
		},
		{name: "tcp by name", kind: policy.ProbeTCP, target: fmt.Sprintf("check.test:%d", port), wantUsable: true},
		{name: "dns answer", kind: policy.ProbeDNS, target: "up.test", wantUsable: true},
		{name: "dns without addresses", kind: policy.ProbeDNS, target: "empty.test", wantReason: "probe has not passed yet: resolving empty.test: no addresses"},
		{name: "dns silent", kind: policy.ProbeDNS, target: "down.test", wantReason: "probe has not passed yet: dns: no server answered"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wifi := &policy.AccessPoint{Name: "wifi", Interface: "wlan0", Probe: &policy.Probe{
				// One probe only: a second failure under a loaded machine
				// would turn "has not passed yet" into "probe failed".
				Kind: tt.kind, Target: tt.target, Status: tt.status, Interval: time.Hour, Timeout: time.Second,
				Failures: 3, Successes: 1,
			}}
			b := newHealthBed(t, testPolicy(wifi), wlanSnapshot(true), HealthConfig{Resolve: resolve, Query: query})
			if tt.wantUsable {
				waitStatus(t, b.h, wifi, "pass", isUsable)
				return
			}
			st := waitStatus(t, b.h, wifi, "failure", func(st policy.Status) bool { return st.Reason != "probe has not passed yet" })
			if st.Usable || st.Reason != tt.wantReason {
				t.Errorf("status = usable %v, reason %q; want unusable, %q", st.Usable, st.Reason, tt.wantReason)
			}
		})
	}
}

func TestHealthPausesProbeWhileLinkDown(t *testing.T) {
	addr, _ := listenTCP(t, "127.0.0.1:0")
	wifi := &policy.AccessPoint{Name: "wifi", Interface: "wlan0", Probe: &policy.Probe{
		Kind: policy.ProbeTCP, Target: addr, Interval: time.Hour, Timeout: time.Second,
		Failures: 3, Successes: 2,
	}}
	b := newHealthBed(t, testPolicy(wifi), wlanSnapshot(true), HealthConfig{})
	waitStatus(t, b.h, wifi, "first pass", isUsable)

	b.setState(wlanSnapshot(false))
	st := waitStatus(t, b.h, wifi, "link down", isNotUsable)
	if want := "tcp " + addr + " every 1h0m0s: paused while the link is unusable"; st.Probe != want {
		t.Errorf("probe = %q, want %q", st.Probe, want)
	}

	// The probe runs as soon as the link is back, not an interval later,
	// and one pass is enough after the link came back.
	b.setState(wlanSnapshot(true))
	waitStatus(t, b.h, wifi, "probe after link up", isUsable)
}

func TestHealthRecreatedInterface(t *testing.T) {
	wifi := &policy.AccessPoint{Name: "wifi", Interface: "wlan0"}
	b := newHealthBed(t, testPolicy(wifi), wlanSnapshot(true), HealthConfig{})

	recreated := newSnapshot([]Interface{{Index: 9, Name: "wlan0", Up: true, Carrier: true,
		Addrs: mustPrefixes("192.0.2.2/24"), Preferred: mustAddrs("192.0.2.2")}},
		[]defaultRoute{{IfIndex: 9, Gateway: netip.MustParseAddr("192.0.2.1")}})
	before := time.Now()
	b.setState(recreated)
	st := waitStatus(t, b.h, wifi, "return after re-creation", func(st policy.Status) bool { return st.Usable && !st.Since.IsZero() })
	if st.Since.Before(before) {
		t.Errorf("since = %v, want the time of the re-creation (after %v)", st.Since, before)
	}

	b.mu.Lock()
	defer b.mu.Unlock()
	var got []string
	for _, c := range b.changes {
		if c.UsableChanged() {
			got = append(got, fmt.Sprintf("usable=%v %s", c.New.Usable, c.New.Reason))
		}
	}
	want := []string{"usable=false interface wlan0 was re-created with index 9", "usable=true "}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("changes %q, want %q", got, want)
	}
}

func TestHealthUpdate(t *testing.T) {
	addr, _ := listenTCP(t, "127.0.0.1:0")
	probe := func(interval time.Duration) *policy.Probe {
		return &policy.Probe{Kind: policy.ProbeTCP, Target: addr, Interval: interval, Timeout: time.Second, Failures: 2, Successes: 1}
	}
	wifi := &policy.AccessPoint{Name: "wifi", Interface: "wlan0", Probe: probe(time.Hour)}
	cell := &policy.AccessPoint{Name: "cell", Interface: "wlan0", Probe: probe(time.Hour)}
	b := newHealthBed(t, testPolicy(wifi, cell), wlanSnapshot(true), HealthConfig{})
	waitStatus(t, b.h, wifi, "first pass", isUsable)
	waitStatus(t, b.h, cell, "first pass", isUsable)
	before := len(b.usableFlips())

	// The reloaded policy keeps wifi as it was, probes cell differently
	// and adds eth.
	wifi2 := &policy.AccessPoint{Name: "wifi", Interface: "wlan0", Probe: probe(time.Hour)}
	cell2 := &policy.AccessPoint{Name: "cell", Interface: "wlan0", Probe: probe(30 * time.Minute)}
	eth := &policy.AccessPoint{Name: "eth", Interface: "wlan0"}
	p2 := testPolicy(wifi2, cell2, eth)
	b.mgr.dialers.Store(&dialerSet{cur: newDialers(p2, assignSlots(p2, nil), b.mgr.monitor, b.mgr.RoutesReady)})
	b.h.Update(p2)

	if st := b.h.Status(wifi2); !st.Usable || st.Latency <= 0 {
		t.Errorf("wifi after the reload = %+v, want it usable with its latency kept", st)
	}
	if st := b.h.Status(eth); !st.Usable {
		t.Errorf("new access point eth = %+v, want usable", st)
	}
	waitStatus(t, b.h, cell2, "first pass of the new probe", isUsable)
	// Plans made with the old policy's apps while the reload swaps the
	// policy still see its access points, until the next reload.
	if st := b.h.Status(wifi); !st.Usable {
		t.Errorf("wifi of the old policy = %+v, want usable as wifi of the new one", st)
	}
	b.h.Update(p2)
	if st := b.h.Status(wifi); st.Usable || st.Reason != `access point "wifi" is not in the policy` {
		t.Errorf("wifi of the old policy after a second reload = %+v, want unknown", st)
	}
	for _, flip := range b.usableFlips()[before:] {
		if flip == "-wifi" || flip == "+wifi" {
			t.Errorf("the reload changed wifi's usability: %q", b.usableFlips()[before:])
		}
	}
}

func TestHealthProbesThroughGateway(t *testing.T) {
	// The probe target listens, so a probe that bypassed the gateway and
	// dialled it directly would pass.
	addr, _ := listenTCP(t, "127.0.0.1:0")
	tests := []struct {
		name       string
		gatewayErr error
		wantUsable bool
		wantReason string
	}{
		{name: "gateway answers", wantUsable: true},
		{
			name:       "gateway down",
			gatewayErr: errors.New("reaching gateway proxy 192.0.2.8:1080: connection refused"),
			wantReason: "probe has not passed yet: reaching gateway proxy 192.0.2.8:1080: connection refused",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			corp := &policy.AccessPoint{Name: "corp", Interface: "wlan0",
				Proxy: &policy.GatewayProxy{Protocol: policy.ProxySOCKS5, Address: "192.0.2.8:1080"},
				Probe: &policy.Probe{Kind: policy.ProbeTCP, Target: addr, Interval: time.Hour, Timeout: time.Second, Failures: 3, Successes: 1},
			}
			var mu sync.Mutex
			var dialled []string
			gatewayDial := func(ctx context.Context, ap *policy.AccessPoint, target string) (net.Conn, error) {
				mu.Lock()
				dialled = append(dialled, ap.Name+" "+target)
				mu.Unlock()
				if tt.gatewayErr != nil {
					return nil, tt.gatewayErr
				}
				var d net.Dialer
				return d.DialContext(ctx, "tcp", target)
			}
			b := newHealthBed(t, testPolicy(corp), wlanSnapshot(true), HealthConfig{GatewayDial: gatewayDial})

			if tt.wantUsable {
				waitStatus(t, b.h, corp, "pass", isUsable)
			} else {
				st := waitStatus(t, b.h, corp, "failure", func(st policy.Status) bool { return st.Reason != "probe has not passed yet" })
				if st.Usable || st.Reason != tt.wantReason {
					t.Errorf("status = usable %v, reason %q; want unusable, %q", st.Usable, st.Reason, tt.wantReason)
				}
			}
			mu.Lock()
			defer mu.Unlock()
			if len(dialled) == 0 || dialled[0] != "corp "+addr {
				t.Errorf("gateway dials = %q, want the probe target %q through corp's gateway", dialled, addr)
			}
		})
	}
}
