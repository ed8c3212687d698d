package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"iapd/dns"
	"iapd/policy"
)

// TestMain fails the run when goroutines outlive the tests: every server,
// tunnel and test server must be gone once its test has returned.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if leaked := waitGoroutines(2 * time.Second); leaked != "" {
			fmt.Fprintf(os.Stderr, "goroutines left after the tests:\n\n%s\n", leaked)
			code = 1
		}
	}
	os.Exit(code)
}

// waitGoroutines waits up to timeout for the goroutines that the tests
// started to end, and returns the stacks of those still running.
func waitGoroutines(timeout time.Duration) string {
	deadline := time.Now().Add(timeout)
	for {
		leaked := testGoroutines()
		if len(leaked) == 0 {
			return ""
		}
		if time.Now().After(deadline) {
			return strings.Join(leaked, "\n\n")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// testGoroutines returns the stacks of the goroutines other than this one
// and those that the runtime and the testing package keep.
func testGoroutines() []string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var leaked []string
	for i, g := range strings.Split(string(buf), "\n\n") {
		if i == 0 || g == "" { // the first is the calling goroutine
			continue
		}
		if strings.Contains(g, "testing.(*M).") ||
			strings.Contains(g, "testing.Main(") ||
			strings.Contains(g, "os/signal.signal_recv") ||
			strings.Contains(g, "runtime.ensureSigM") ||
			strings.Contains(g, "created by runtime.gc") {
			continue
		}
		leaked = append(leaked, g)
	}
	return leaked
}

// newTestLogger returns a logger that writes through t.Log at Debug.
func newTestLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// testPolicy returns the policy of the package's tests. Listeners, by index:
// 0 socks5 app web; 1 socks5 users alice (app mail) and bob (app web);
// 2 mixed app web; 3 http app web; 4 http users as 1; 5 socks5 app mail;
// 6 mixed app strict. App web uses the destination internet, which is
// access point a then b; apps mail and strict use access point b alone.
// Web and mail may reach local targets, which the loopback servers of the
// tests are; strict may not.
func testPolicy(t testing.TB) *policy.Policy {
	t.Helper()
	return testPolicyWith(t, "")
}

// testPolicyWith is testPolicy with rules added to the destination
// internet: YAML lines indented by four spaces, like "    select: race".
func testPolicyWith(t testing.TB, internetRules string) *policy.Policy {
	t.Helper()
	hash := func(password string) string {
		h, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
		if err != nil {
			t.Fatalf("hashing test password: %v", err)
		}
		return string(h)
	}
	users := fmt.Sprintf(`
      - name: alice
        password_hash: %q
        app: mail
      - name: bob
        password_hash: %q
        app: web`, hash("alice-secret"), hash("bob-secret"))
	yaml := `
listeners:
  - listen: "127.0.0.1:0"
    protocol: socks5
    app: web
  - listen: "127.0.0.1:0"
    protocol: socks5
    users:` + users + `
  - listen: "127.0.0.1:0"
    protocol: mixed
    app: web
  - listen: "127.0.0.1:0"
    protocol: http
    app: web
  - listen: "127.0.0.1:0"
    protocol: http
    users:` + users + `
  - listen: "127.0.0.1:0"
    protocol: socks5
    app: mail
  - listen: "127.0.0.1:0"
    protocol: mixed
    app: strict
apps:
  web:
    destination: internet
    allow_local_targets: true
  mail:
    access_point: b
    allow_local_targets: true
  strict:
    access_point: b
access_points:
  a:
    interface: eth-a
    dns: [192.0.2.53]
  b:
    interface: eth-b
    dns: [198.51.100.53]
destinations:
  internet:
    access_points: [a, b]
` + internetRules
	p, err := policy.Parse("test.yaml", []byte(yaml))
	if err != nil {
		t.Fatalf("parsing test policy: %v", err)
	}
	return p
}

// dialBehaviour is what a fake access point's dialer does.
type dialBehaviour int

const (
	dialOK        dialBehaviour = iota // dial loopback for real
	dialRefuse                         // fail with ECONNREFUSED
	dialHang                           // wait until the context ends
	dialFail                           // fail with EHOSTUNREACH
	dialPanic                          // panic in DialContext
	dialPanicRead                      // dial loopback, then panic on the first read
)

// fakeNetwork is a Network of access points whose dialers reach loopback
// only and record which access point dialled. Resolvers know the names of
// fakeNames.
type fakeNetwork struct {
	t testing.TB

	mu        sync.Mutex
	behaviour map[string]dialBehaviour // by access point; dialOK when absent
	unusable  map[string]string        // access point to reason
	dialed    []string                 // "access point address", in order
	lookups   []string                 // "access point name", in order
	reports   []string                 // "access point ok" or "access point failed", in order
	turn      uint64                   // round-robin counter
}

func newFakeNetwork(t testing.TB) *fakeNetwork {
	return &fakeNetwork{t: t, behaviour: map[string]dialBehaviour{}, unusable: map[string]string{}}
}

func (f *fakeNetwork) setDial(ap string, b dialBehaviour) {
	f.mu.Lock()
	f.behaviour[ap] = b
	f.mu.Unlock()
}

func (f *fakeNetwork) setUnusable(ap, reason string) {
	f.mu.Lock()
	f.unusable[ap] = reason
	f.mu.Unlock()
}

// dials returns the dials made so far, as "access point address".
func (f *fakeNetwork) dials() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.dialed...)
}

func (f *fakeNetwork) resolved() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.lookups...)
}

func (f *fakeNetwork) Conditions() policy.Conditions { return fakeConditions{f} }

func (f *fakeNetwork) ReportDial(ap *policy.AccessPoint, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		f.reports = append(f.reports, ap.Name+" ok")
		return
	}
	var de *DialError
	if !errors.As(err, &de) {
		f.t.Errorf("ReportDial(%s) with %T, want *DialError", ap.Name, err)
	}
	f.reports = append(f.reports, ap.Name+" failed")
}

// dialReports returns what ReportDial was told so far.
func (f *fakeNetwork) dialReports() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.reports...)
}

func (f *fakeNetwork) Dialer(ap *policy.AccessPoint) Dialer { return fakeDialer{f, ap.Name} }

func (f *fakeNetwork) Resolver(ap *policy.AccessPoint) Resolver { return fakeResolver{f, ap.Name} }

func (f *fakeNetwork) Interface(ap *policy.AccessPoint) string { return ap.Interface }

// fakeConditions makes every access point usable for both families
// unless fakeNetwork.setUnusable says otherwise.
type fakeConditions struct{ f *fakeNetwork }

func (c fakeConditions) Status(ap *policy.AccessPoint) policy.Status {
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	reason, bad := c.f.unusable[ap.Name]
	return policy.Status{Usable: !bad, Reason: reason, IPv4: true, IPv6: true, Link: policy.Link{Interface: ap.Interface}}
}

func (c fakeConditions) Now() time.Time                                  { return time.Now() }
func (c fakeConditions) Current(*policy.Destination) *policy.AccessPoint { return nil }

func (c fakeConditions) Turn(*policy.Destination) uint64 {
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	c.f.turn++
	return c.f.turn - 1
}

type fakeResolver struct {
	f  *fakeNetwork
	ap string
}

var fakeNames = map[string][]netip.Addr{
	"web.test":   {netip.MustParseAddr("127.0.0.1")},
	"web6.test":  {netip.MustParseAddr("::1")},
	"dual.test":  {netip.MustParseAddr("::1"), netip.MustParseAddr("127.0.0.1")},
	"local.test": {netip.MustParseAddr("169.254.7.7"), netip.MustParseAddr("fe80::7"), netip.MustParseAddr("0.0.0.0"), netip.MustParseAddr("::ffff:127.0.0.9")},
	// rebind.test has one address elsewhere and one on loopback, as a
	// DNS rebinding answer would.
	"rebind.test": {netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("203.0.113.80")},
}

func (r fakeResolver) LookupNetIP(ctx context.Context, host string) ([]netip.Addr, error) {
	r.f.mu.Lock()
	r.f.lookups = append(r.f.lookups, r.ap+" "+host)
	r.f.mu.Unlock()
	if len(host) > 253 {
		// As the real resolver, which sends no query for such a name.
		return nil, &dns.Error{Name: host, AccessPoint: r.ap, Err: dns.ErrInvalidName}
	}
	addrs, ok := fakeNames[host]
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	return append([]netip.Addr(nil), addrs...), nil
}

type fakeDialer struct {
	f  *fakeNetwork
	ap string
}

func (d fakeDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	d.f.mu.Lock()
	d.f.dialed = append(d.f.dialed, d.ap+" "+address)
	b := d.f.behaviour[d.ap]
	d.f.mu.Unlock()

	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		d.f.t.Errorf("fake dialer of %s asked for %q, which is not IP:port", d.ap, address)
		return nil, errors.New("fake network: not IP:port")
	}
	opErr := func(errno syscall.Errno) error {
		return &net.OpError{Op: "dial", Net: network, Addr: net.TCPAddrFromAddrPort(ap), Err: os.NewSyscallError("connect", errno)}
	}
	switch b {
	case dialRefuse:
		return nil, opErr(syscall.ECONNREFUSED)
	case dialFail:
		return nil, opErr(syscall.EHOSTUNREACH)
	case dialHang:
		<-ctx.Done()
		return nil, &net.OpError{Op: "dial", Net: network, Addr: net.TCPAddrFromAddrPort(ap), Err: ctx.Err()}
	case dialPanic:
		panic("fake network: dialer panics")
	}

	// Tests must never reach past loopback.
	if !ap.Addr().IsLoopback() {
		d.f.t.Errorf("fake dialer of %s asked for %q, which is not a loopback address", d.ap, address)
		return nil, errors.New("fake network: not a loopback address")
	}
	var nd net.Dialer
	c, err := nd.DialContext(ctx, network, address)
	if err == nil && b == dialPanicRead {
		return panicReader{c}, nil
	}
	return c, err
}

// panicReader is a connection that panics when read from.
type panicReader struct{ net.Conn }

func (panicReader) Read([]byte) (int, error) { panic("fake network: connection panics on read") }

// startServer serves l on a new loopback listener and returns the server
// and the listener's address. The server is closed in t.Cleanup, which also
// checks that Serve returned nil.
func startServer(t testing.TB, cfg Config, l *policy.Listener) (*Server, string) {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = newTestLogger(t)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening: %v", err)
	}
	s := NewServer(cfg)
	served := make(chan error, 1)
	go func() { served <- s.Serve(ln, l) }()
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("Serve returned %v after Close, want nil", err)
		}
	})
	return s, ln.Addr().String()
}

// startEchoServer listens on network ("tcp4" or "tcp6") loopback. On each
// connection it reads until EOF, then writes back "echo:" and what it read,
// and closes. Reading to EOF first shows that a client's
// half-close arrived while the way back stayed open.
func startEchoServer(t testing.TB, network string) string {
	t.Helper()
	host := "127.0.0.1"
	if network == "tcp6" {
		host = "[::1]"
	}
	ln, err := net.Listen(network, host+":0")
	if err != nil {
		t.Fatalf("listening on %s: %v", network, err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if errors.Is(err, syscall.EMFILE) {
				// A test ran the process out of descriptors for a moment.
				time.Sleep(10 * time.Millisecond)
				continue
			}
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				data, err := io.ReadAll(c)
				if err != nil {
					return
				}
				c.Write(append([]byte("echo:"), data...))
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().String()
}

// closedPort returns a loopback address on which nothing listens.
func closedPort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening: %v", err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}
