package admin

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"iapd/iface"

	"iapd/internal/event"
	"iapd/policy"
	"iapd/proxy"
)

const testPolicyYAML = `
listeners:
  - listen: "127.0.0.1:1080"
    protocol: socks5
    app: browser
  - listen: "0.0.0.0:3128"
    protocol: http
    app: corp
    allow_clients: [192.0.2.0/24]
apps:
  browser:
    destination: internet
  corp:
    access_point: vpn
access_points:
  wifi:
    interface: wlan0
    dns: [192.0.2.53]
  cell:
    interface: wwan0
    dns: [198.51.100.53]
  vpn:
    interface: tun0
    dns: [203.0.113.53]
destinations:
  internet:
    access_points: [wifi, cell]
control:
  http: 127.0.0.1:9180
  pac:
    - hosts: ["*.corp.example", 10.0.0.0/8, "2001:DB8::/32"]
      app: corp
    - hosts: [localhost]
      direct: true
    - hosts: ["*"]
      app: browser
`

func parseTestPolicy(t *testing.T) *policy.Policy {
	t.Helper()
	p, err := policy.Parse("iapd.yaml", []byte(testPolicyYAML))
	if err != nil {
		t.Fatalf("parsing test policy: %v", err)
	}
	return p
}

// fakeDaemon is a Daemon over a policy, with usability from a map.
type fakeDaemon struct {
	p *policy.Policy

	bound        map[string]OpenListener // address and counters by listen address; missing is idle at l.Listen
	dnsListeners []DNSListenerStatus

	mu        sync.Mutex
	unusable  map[string]string
	conns     []proxy.ConnInfo
	closed    []uint64
	reloadErr error
}

func (d *fakeDaemon) Policy() *policy.Policy                  { return d.p }
func (d *fakeDaemon) Snapshot() *iface.Snapshot               { return nil }
func (d *fakeDaemon) Conditions() policy.Conditions           { return d }
func (d *fakeDaemon) Interface(ap *policy.AccessPoint) string { return ap.Interface }
func (d *fakeDaemon) ListenerAddr(l *policy.Listener) string  { return l.Listen }

// Listeners returns every listener of the policy as open, with the
// address and counters that d.bound gives it.
func (d *fakeDaemon) Listeners() ([]OpenListener, []DNSListenerStatus) {
	var open []OpenListener
	for _, l := range d.p.Listeners {
		ol, ok := d.bound[l.Listen]
		if !ok {
			ol.Address = l.Listen
		}
		ol.Listener = l
		open = append(open, ol)
	}
	return open, d.dnsListeners
}

// Status makes an access point usable for both families unless
// d.unusable names it.
func (d *fakeDaemon) Status(ap *policy.AccessPoint) policy.Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	reason, bad := d.unusable[ap.Name]
	return policy.Status{Usable: !bad, Reason: reason, IPv4: true, IPv6: true, Link: policy.Link{Interface: ap.Interface}}
}

func (d *fakeDaemon) Now() time.Time                                  { return time.Now() }
func (d *fakeDaemon) Current(*policy.Destination) *policy.AccessPoint { return nil }
func (d *fakeDaemon) Turn(*policy.Destination) uint64                 { return 0 }

func (d *fakeDaemon) Conns() []proxy.ConnInfo {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]proxy.ConnInfo(nil), d.conns...)
}

func (d *fakeDaemon) CloseConn(id uint64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	for i, c := range d.conns {
		if c.ID == id {
			d.conns = append(d.conns[:i], d.conns[i+1:]...)
			d.closed = append(d.closed, id)
			return true
		}
	}
	return false
}

func (d *fakeDaemon) Reload() (*ReloadReport, error) {
	if d.reloadErr != nil {
		return nil, d.reloadErr
	}
	return &ReloadReport{Policy: PolicyStatus{Path: d.p.Path, Hash: d.p.Hash}}, nil
}

// startControl serves the control API of a new Server over d on a Unix
// socket in t's temporary directory and returns a client of it.
func startControl(t *testing.T, d *fakeDaemon) (*Server, *Client, *event.Bus) {
	t.Helper()
	bus := event.NewBus()
	usage := NewUsage(d.Conns)
	s := New(Config{Daemon: d, Bus: bus, Usage: usage, Metrics: NewMetrics(d, usage, bus, "test"),
		Version: "test", Started: time.Now(), Logger: slog.New(slog.DiscardHandler)})
	path := filepath.Join(t.TempDir(), "iapd.sock")
	ln, err := ListenSocket(path, 0o600)
	if err != nil {
		t.Fatalf("ListenSocket: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln, s.ControlHandler()) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s, NewClient(path), bus
}

func TestControlAPI(t *testing.T) {
	p := parseTestPolicy(t)
	d := &fakeDaemon{p: p, unusable: map[string]string{"wifi": "interface wlan0 is down"}, conns: []proxy.ConnInfo{
		{ID: 7, App: "browser", Listener: "127.0.0.1:1080", Target: "example.com:443", AccessPoint: "cell", Interface: "wwan0", Started: time.Now(), BytesUp: 10, BytesDown: 2000},
	}}
	_, c, _ := startControl(t, d)
	ctx := context.Background()

	st, err := c.Status(ctx)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if st.Version != "test" || st.Policy.Path != "iapd.yaml" || st.Connections != 1 || len(st.Listeners) != 2 || st.Listeners[1].App != "corp" {
		t.Errorf("status = %+v", st)
	}

	aps, err := c.AccessPoints(ctx)
	if err != nil {
		t.Fatalf("AccessPoints: %v", err)
	}
	if len(aps) != 3 || aps[0].Name != "wifi" || aps[0].Usable || aps[0].Reason != "interface wlan0 is down" {
		t.Errorf("access points = %+v, want wifi first and unusable", aps)
	}
	if aps[1].Name != "cell" || !aps[1].Usable || aps[1].Connections != 1 || aps[1].BytesDown != 2000 {
		t.Errorf("cell = %+v, want usable with the open connection's bytes", aps[1])
	}

	dests, err := c.Destinations(ctx)
	if err != nil {
		t.Fatalf("Destinations: %v", err)
	}
	var internet DestinationStatus
	for _, dest := range dests {
		if dest.Name == "internet" {
			internet = dest
		}
	}
	if internet.Current != "cell" || strings.Join(internet.Apps, ",") != "browser" {
		t.Errorf("internet = %+v, want current cell and app browser", internet)
	}

	apps, err := c.Apps(ctx)
	if err != nil {
		t.Fatalf("Apps: %v", err)
	}
	if len(apps) != 2 || apps[0].Name != "browser" || apps[0].BytesDown != 2000 || len(apps[0].AccessPoints) != 1 || apps[0].AccessPoints[0].AccessPoint != "cell" {
		t.Errorf("apps = %+v", apps)
	}

	ex, err := c.Explain(ctx, "browser", "example.com:443")
	if err != nil {
		t.Fatalf("Explain: %v", err)
	}
	if ex.Destination != "internet" || ex.Chosen != "cell" || len(ex.AccessPoints) != 2 || ex.AccessPoints[0].Order != 0 || ex.AccessPoints[1].Order != 1 {
		t.Errorf("explanation = %+v", ex)
	}
	_, err = c.Explain(ctx, "nobody", "example.com:443")
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 400 || apiErr.Error() != `no app named "nobody" in iapd.yaml` {
		t.Errorf("Explain of an unknown app = %v", err)
	}

	if err := c.CloseConn(ctx, 8); !errors.As(err, &apiErr) || apiErr.StatusCode != 404 || apiErr.Error() != "no open connection with ID 8" {
		t.Errorf("CloseConn(8) = %v, want 404", err)
	}
	if err := c.CloseConn(ctx, 7); err != nil {
		t.Errorf("CloseConn(7): %v", err)
	}
	if conns, _ := c.Conns(ctx); len(conns) != 0 {
		t.Errorf("connections after closing = %+v", conns)
	}
}

func TestReloadReportsProblems(t *testing.T) {
	d := &fakeDaemon{p: parseTestPolicy(t)}
	_, bad := policy.Parse("bad.yaml", []byte("listeners: []\n"))
	d.reloadErr = bad
	_, c, _ := startControl(t, d)

	_, err := c.Reload(context.Background())
	var apiErr *APIError
	if !errors.As(err, &apiErr) {
		t.Fatalf("Reload = %v, want an APIError", err)
	}
	if apiErr.StatusCode != 422 || apiErr.Error() != "policy rejected with 3 problem(s); iapd keeps serving the policy it had" {
		t.Errorf("Reload error = %d %q", apiErr.StatusCode, apiErr.Error())
	}
	want := []string{
		"bad.yaml:1:1: missing apps",
		"bad.yaml:1:1: missing access_points",
		"bad.yaml:1:12: listeners: empty list, at least one listener is required",
	}
	var got []string
	for _, p := range apiErr.Problems {
		got = append(got, p.PolicyError().Error())
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("problems:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestReloadReportsOtherError(t *testing.T) {
	d := &fakeDaemon{p: parseTestPolicy(t)}
	d.reloadErr = errors.New("opening listener 127.0.0.1:1080: address already in use")
	_, c, _ := startControl(t, d)

	_, err := c.Reload(context.Background())
	var apiErr *APIError
	if !errors.As(err, &apiErr) {
		t.Fatalf("Reload = %v, want an APIError", err)
	}
	want := "reload rejected; iapd keeps serving the policy it had: opening listener 127.0.0.1:1080: address already in use"
	if apiErr.StatusCode != 422 || apiErr.Error() != want {
		t.Errorf("Reload error = %d %q, want 422 %q", apiErr.StatusCode, apiErr.Error(), want)
	}
	if len(apiErr.Problems) != 0 {
		t.Errorf("problems = %+v, want none", apiErr.Problems)
	}
}

func TestEventStream(t *testing.T) {
	_, c, bus := startControl(t, &fakeDaemon{p: parseTestPolicy(t)})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	var got []event.Event
	err := c.Events(ctx, func() error {
		bus.Publish(event.Event{Kind: event.AccessPointUnusable, AccessPoint: "wifi", Reason: "interface wlan0 is down"})
		bus.Publish(event.Event{Kind: event.DestinationSwitched, Destination: "internet", From: "wifi", To: "cell"})
		return nil
	}, func(e event.Event) error {
		got = append(got, e)
		if len(got) == 2 {
			return errWaitTest
		}
		return nil
	})
	if !errors.Is(err, errWaitTest) {
		t.Fatalf("Events = %v", err)
	}
	if got[0].Seq != 1 || got[0].Kind != event.AccessPointUnusable || got[0].Reason != "interface wlan0 is down" {
		t.Errorf("first event = %+v", got[0])
	}
	if got[1].Kind != event.DestinationSwitched || got[1].From != "wifi" || got[1].To != "cell" {
		t.Errorf("second event = %+v", got[1])
	}
}

var errWaitTest = errors.New("enough events")

func TestClientUnreachable(t *testing.T) {
	c := NewClient(filepath.Join(t.TempDir(), "missing.sock"))
	_, err := c.Status(context.Background())
	if !errors.Is(err, ErrUnreachable) {
		t.Errorf("Status without a daemon = %v, want ErrUnreachable", err)
	}
}

func TestListenSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "run", "iapd.sock")
	ln, err := ListenSocket(path, 0o660)
	if err != nil {
		t.Fatalf("ListenSocket: %v", err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode = %v, %v; want 0660", fi.Mode().Perm(), err)
	}

	// A second daemon must not take over a socket that is served.
	if _, err := ListenSocket(path, 0o660); err == nil || err.Error() != "creating control socket: another iapd serves "+path {
		t.Errorf("second ListenSocket = %v", err)
	}
	// A socket left by a crashed daemon is replaced.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	ln, err = ListenSocket(path, 0o600)
	if err != nil {
		t.Fatalf("ListenSocket over a stale socket: %v", err)
	}
	ln.Close()

	plain := filepath.Join(dir, "file")
	os.WriteFile(plain, nil, 0o600)
	if _, err := ListenSocket(plain, 0o660); err == nil || err.Error() != "creating control socket: "+plain+" exists and is not a socket" {
		t.Errorf("ListenSocket over a file = %v", err)
	}
}

func TestUsageCountsEachByteOnce(t *testing.T) {
	var mu sync.Mutex
	live := []proxy.ConnInfo{{ID: 1, App: "browser", AccessPoint: "wifi", BytesUp: 10, BytesDown: 100}}
	u := NewUsage(func() []proxy.ConnInfo {
		mu.Lock()
		defer mu.Unlock()
		return append([]proxy.ConnInfo(nil), live...)
	})

	check := func(when string, want UsageRow) {
		t.Helper()
		rows := u.Rows()
		if len(rows) != 1 || rows[0] != want {
			t.Errorf("%s: rows %+v, want %+v", when, rows, want)
		}
	}
	check("open", UsageRow{App: "browser", AccessPoint: "wifi", Open: 1, Total: 1, BytesUp: 10, BytesDown: 100})

	mu.Lock()
	live[0].BytesDown = 300
	mu.Unlock()
	check("grown", UsageRow{App: "browser", AccessPoint: "wifi", Open: 1, Total: 1, BytesUp: 10, BytesDown: 300})

	mu.Lock()
	live = nil
	mu.Unlock()
	u.Closed(proxy.ConnInfo{ID: 1, App: "browser", AccessPoint: "wifi", BytesUp: 12, BytesDown: 500})
	check("closed", UsageRow{App: "browser", AccessPoint: "wifi", Open: 0, Total: 1, BytesUp: 12, BytesDown: 500})

	// A connection that closed before any look counts once too.
	u.Closed(proxy.ConnInfo{ID: 2, App: "browser", AccessPoint: "wifi", BytesUp: 1, BytesDown: 1})
	check("short", UsageRow{App: "browser", AccessPoint: "wifi", Open: 0, Total: 2, BytesUp: 13, BytesDown: 501})
}

func TestDialErrorReason(t *testing.T) {
	opErr := func(errno syscall.Errno) error {
		return &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", errno)}
	}
	tests := []struct {
		name string
		err  *proxy.DialError
		want string
	}{
		{name: "nothing usable", err: &proxy.DialError{Op: "select", Err: policy.ErrNoUsableAccessPoint}, want: "no_usable_access_point"},
		{name: "resolve", err: &proxy.DialError{Op: "resolve", Err: &net.DNSError{Err: "no such host", IsNotFound: true}}, want: "resolve"},
		{name: "refused", err: &proxy.DialError{Op: "connect", Err: opErr(syscall.ECONNREFUSED)}, want: "refused"},
		{name: "unreachable", err: &proxy.DialError{Op: "connect", Err: opErr(syscall.EHOSTUNREACH)}, want: "unreachable"},
		{name: "timeout", err: &proxy.DialError{Op: "connect", Err: context.DeadlineExceeded}, want: "timeout"},
		{name: "other", err: &proxy.DialError{Op: "connect", Err: errors.New("boom")}, want: "other"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := DialErrorReason(tt.err); got != tt.want {
				t.Errorf("DialErrorReason = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestPAC(t *testing.T) {
	p := parseTestPolicy(t)
	pac := PAC(p, func(l *policy.Listener) string { return l.Listen })
	for _, want := range []string{
		`"patterns": [
      "*.corp.example"
    ],
    "prefixes": [
      "10.0.0.0/8",
      "2001:db8::/32"
    ],
    "proxy": "PROXY 127.0.0.1:3128"`,
		`"patterns": [
      "localhost"
    ],
    "prefixes": [],
    "proxy": "DIRECT"`,
		`"proxy": "SOCKS5 127.0.0.1:1080"`,
		"function FindProxyForURL(url, host) {",
	} {
		if !strings.Contains(pac, want) {
			t.Errorf("PAC file lacks %q", want)
		}
	}
	for _, banned := range []string{"dnsResolve(", "isInNet(", "myIpAddress("} {
		if strings.Contains(pac, banned) {
			t.Errorf("PAC file calls %s, which would resolve names in the browser", banned)
		}
	}
}

func TestWatcherPublishes(t *testing.T) {
	p := parseTestPolicy(t)
	d := &fakeDaemon{p: p, unusable: map[string]string{}}
	bus := event.NewBus()
	events, stop := bus.Subscribe(16)
	defer stop()
	metrics := NewMetrics(d, NewUsage(d.Conns), bus, "test")
	w := NewWatcher(bus, metrics, d.Policy, nil)

	w.Publish(event.Event{Kind: event.AccessPointUnusable, AccessPoint: "wifi", Reason: "interface wlan0 is down"})
	w.Publish(event.Event{Kind: event.DestinationSwitched, Destination: "internet", From: "wifi", To: "cell"})

	want := []string{
		"access_point_unusable wifi interface wlan0 is down",
		"destination_switched internet wifi>cell",
	}
	for _, line := range want {
		select {
		case e := <-events:
			got := string(e.Kind) + " " + e.AccessPoint + e.Destination + " " + e.Reason
			if e.Kind == event.DestinationSwitched {
				got = string(e.Kind) + " " + e.Destination + " " + e.From + ">" + e.To
			}
			if got != line {
				t.Errorf("event %q, want %q", got, line)
			}
		case <-time.After(time.Second):
			t.Fatalf("no event, want %q", line)
		}
	}
	if got := testutil.ToFloat64(metrics.switches.WithLabelValues("internet")); got != 1 {
		t.Errorf("destination switches of internet = %v, want 1", got)
	}
}

func TestWatcherInterfaceEvents(t *testing.T) {
	p, err := policy.Parse("links.yaml", []byte(`
listeners:
  - listen: "127.0.0.1:0"
    app: browser
apps:
  browser: {access_point: local}
access_points:
  local: {interface: lo, dns: [192.0.2.53]}
`))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	bus := event.NewBus()
	events, stop := bus.Subscribe(8)
	defer stop()
	w := NewWatcher(bus, nil, func() *policy.Policy { return p }, nil)

	m, err := iface.NewMonitor(nil)
	if err != nil {
		t.Fatalf("NewMonitor: %v", err)
	}
	defer m.Close()
	// Every interface of the host appears at once; only lo is the
	// policy's, so only its change is published.
	w.Changed(nil, m.Snapshot())
	select {
	case e := <-events:
		if e.Kind != event.InterfaceAdded || e.Interface != "lo" {
			t.Errorf("event %+v, want lo added", e)
		}
	case <-time.After(time.Second):
		t.Fatal("no event for lo")
	}
	select {
	case e := <-events:
		t.Errorf("published %+v for an interface the policy does not name", e)
	default:
	}
}
