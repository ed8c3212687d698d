package proxy

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"iapd/policy"
)

// parsePolicy parses a policy for one test.
func parsePolicy(t *testing.T, yaml string) *policy.Policy {
	t.Helper()
	p, err := policy.Parse("test.yaml", []byte(yaml))
	if err != nil {
		t.Fatalf("parsing test policy: %v", err)
	}
	return p
}

// startServerListeners serves every listener of ls with one server on
// loopback listeners of its own, and returns their addresses in order.
func startServerListeners(t *testing.T, cfg Config, ls []*policy.Listener) (*Server, []string) {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = newTestLogger(t)
	}
	s := NewServer(cfg)
	var addrs []string
	var wg sync.WaitGroup
	for _, l := range ls {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("listening: %v", err)
		}
		addrs = append(addrs, ln.Addr().String())
		wg.Go(func() {
			if err := s.Serve(ln, l); err != nil {
				t.Errorf("Serve: %v", err)
			}
		})
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		wg.Wait()
	})
	return s, addrs
}

// socks5Reply sends a CONNECT to target over a new connection to the
// SOCKS5 listener at addr, and returns the connection and the reply code.
func socks5Reply(t *testing.T, addr, target string) (*net.TCPConn, byte) {
	t.Helper()
	c := dialProxy(t, addr)
	c.Write(slices.Concat(greeting(methodNoAuth), request(t, 1, target)))
	if got := readExactly(t, c, 2); !bytes.Equal(got, []byte{5, methodNoAuth}) {
		t.Fatalf("method selection % x, want 05 00", got)
	}
	head := readExactly(t, c, 4)
	size := 4
	if head[3] == 4 {
		size = 16
	}
	readExactly(t, c, size+2)
	return c, head[1]
}

// expectEOF checks that the proxy ends c within a few seconds, without
// sending anything more.
func expectEOF(t *testing.T, c net.Conn, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	rest, err := io.ReadAll(c)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("%s: reading: %v, want EOF", what, err)
	}
	if len(rest) > 0 {
		t.Errorf("%s: read %q, want nothing", what, rest)
	}
}

func TestListenerAllowClients(t *testing.T) {
	echo := startEchoServer(t, "tcp4")
	tests := []struct {
		name        string
		allow       []netip.Prefix
		wantServed  bool
		wantRefused uint64
	}{
		{name: "no ranges", wantServed: true},
		{name: "loopback allowed", allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, wantServed: true},
		{name: "loopback outside", allow: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}, wantRefused: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			network := newFakeNetwork(t)
			l := *testPolicy(t).Listeners[0]
			l.AllowClients = tt.allow
			s, addr := startServer(t, Config{Network: network}, &l)

			c := dialProxy(t, addr)
			c.Write(slices.Concat(greeting(methodNoAuth), request(t, 1, echo)))
			if !tt.wantServed {
				expectEOF(t, c, "client outside allow_clients")
			} else {
				readExactly(t, c, 2)
				readSuccess(t, c)
				exchange(t, c, []byte("allowed"))
			}
			if got := s.Stats().ClientsRefused; got != tt.wantRefused {
				t.Errorf("Stats().ClientsRefused = %d, want %d", got, tt.wantRefused)
			}
			if got := onlyListenerStats(t, s).ClientsRefused; got != tt.wantRefused {
				t.Errorf("ListenerStats().ClientsRefused = %d, want %d", got, tt.wantRefused)
			}
			if !tt.wantServed && len(network.dials()) > 0 {
				t.Errorf("dials %q for a refused client, want none", network.dials())
			}
		})
	}
}

func TestListenerMaxConnections(t *testing.T) {
	target := startHoldServer(t)
	network := newFakeNetwork(t)
	l := *testPolicy(t).Listeners[0]
	l.MaxConnections = 2
	s, addr := startServer(t, Config{Network: network}, &l)

	first := openTunnel(t, addr, target.addr)
	firstTarget := target.accept(t)
	openTunnel(t, addr, target.addr)
	target.accept(t)

	third := dialProxy(t, addr)
	third.Write(greeting(methodNoAuth))
	expectEOF(t, third, "third client of a listener capped at 2")
	if got := s.Stats().ListenerFull; got != 1 {
		t.Errorf("Stats().ListenerFull = %d, want 1", got)
	}
	want := ListenerStats{Connections: 2, ListenerFull: 1}
	if got := onlyListenerStats(t, s); got != want {
		t.Errorf("ListenerStats() = %+v, want %+v", got, want)
	}

	// A client that leaves makes room for the next.
	first.Close()
	firstTarget.Close()
	waitFor(t, "the first client to leave", func() bool { return servedClients(s) == 1 })
	openTunnel(t, addr, target.addr)
	target.accept(t)
}

// onlyListenerStats returns the ListenerStats of the one listener that s
// serves.
func onlyListenerStats(t *testing.T, s *Server) ListenerStats {
	t.Helper()
	s.mu.Lock()
	var lns []net.Listener
	for ln := range s.listeners {
		lns = append(lns, ln)
	}
	s.mu.Unlock()
	if len(lns) != 1 {
		t.Fatalf("server serves %d listeners, want 1", len(lns))
	}
	st, ok := s.ListenerStats(lns[0])
	if !ok {
		t.Fatalf("ListenerStats(%s) reports the listener not served", lns[0].Addr())
	}
	return st
}

// servedClients returns how many clients the server's listeners count
// against their caps: those in a handshake and those with a tunnel.
func servedClients(s *Server) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var n int64
	for _, sl := range s.listeners {
		n += sl.active.Load()
	}
	return n
}

// limitsPolicy has listeners, in order, for apps low (priority -5) and high
// (10) on access point b, which takes one connection; peer (-5) on b, then
// a; and capped, which takes one connection of its own, on a.
const limitsPolicy = `
listeners:
  - {listen: "127.0.0.1:0", protocol: socks5, app: low}
  - {listen: "127.0.0.1:0", protocol: socks5, app: high}
  - {listen: "127.0.0.1:0", protocol: socks5, app: peer}
  - {listen: "127.0.0.1:0", protocol: mixed, app: capped}
apps:
  low: {access_point: b, priority: -5, allow_local_targets: true}
  high: {access_point: b, priority: 10, allow_local_targets: true}
  peer: {destination: b-then-a, priority: -5, allow_local_targets: true}
  capped: {access_point: a, max_connections: 1, allow_local_targets: true}
access_points:
  a: {interface: eth-a, dns: [192.0.2.53]}
  b: {interface: eth-b, dns: [198.51.100.53], max_connections: 1}
destinations:
  b-then-a: {access_points: [b, a]}
`

func TestAccessPointDisplacement(t *testing.T) {
	target := startHoldServer(t)
	network := newFakeNetwork(t)
	p := parsePolicy(t, limitsPolicy)
	var rec closeRecorder
	s, addrs := startServerListeners(t, Config{Network: network, OnClose: rec.record, DialTimeout: 2 * time.Second}, p.Listeners)
	low, high, peer := addrs[0], addrs[1], addrs[2]

	lowConn := openTunnel(t, low, target.addr)
	target.accept(t)

	// high takes low's place on b.
	highConn := openTunnel(t, high, target.addr)
	highTarget := target.accept(t)
	expectEOF(t, lowConn, "displaced connection")
	waitFor(t, "the displaced row", func() bool { return len(rec.closed()) == 1 })
	closed := rec.closed()[0]
	if closed.App != "low" || closed.Reason != "displaced by app high with priority 10" {
		t.Errorf("closed row %+v, want app low displaced by app high with priority 10", closed)
	}
	if got := s.Stats().Displaced; got != 1 {
		t.Errorf("Stats().Displaced = %d, want 1", got)
	}
	highConn.Write([]byte("still here"))
	if got := readExactly(t, highTarget, 10); string(got) != "still here" {
		t.Errorf("target of high read %q, want still here", got)
	}

	// peer has low's priority, so it cannot displace high and goes to a;
	// b is not even dialled.
	network.mu.Lock()
	network.dialed = nil
	network.mu.Unlock()
	openTunnel(t, peer, target.addr)
	target.accept(t)
	if got, want := network.dials(), []string{"a " + target.addr}; !slices.Equal(got, want) {
		t.Errorf("dials of peer %q, want %q", got, want)
	}

	// low has nowhere else to go.
	_, code := socks5Reply(t, low, target.addr)
	if code != replyNetworkUnreachable {
		t.Errorf("reply to low on a full access point %#x, want %#x (network unreachable)", code, replyNetworkUnreachable)
	}

	// Once high leaves, low gets b again.
	highConn.Close()
	highTarget.Close()
	waitFor(t, "high to leave b", func() bool { return len(s.Conns()) == 1 })
	openTunnel(t, low, target.addr)
	target.accept(t)
}

// TestDisplacementFailedDial checks that a dial that fails displaces no
// one.
func TestDisplacementFailedDial(t *testing.T) {
	target := startHoldServer(t)
	network := newFakeNetwork(t)
	p := parsePolicy(t, limitsPolicy)
	s, addrs := startServerListeners(t, Config{Network: network, DialTimeout: 2 * time.Second}, p.Listeners)

	lowConn := openTunnel(t, addrs[0], target.addr)
	target.accept(t)
	network.setDial("b", dialRefuse)
	if _, code := socks5Reply(t, addrs[1], target.addr); code != replyConnectionRefused {
		t.Errorf("reply to high %#x, want %#x (connection refused)", code, replyConnectionRefused)
	}
	if got := s.Stats().Displaced; got != 0 {
		t.Errorf("Stats().Displaced = %d, want 0", got)
	}
	lowConn.Write([]byte("x"))
	lowConn.CloseWrite()
	if rows := s.Conns(); len(rows) != 1 || rows[0].App != "low" {
		t.Errorf("table %+v, want low's connection alone", rows)
	}

	// The victim picked for the failed dial may be picked again.
	network.setDial("b", dialOK)
	openTunnel(t, addrs[1], target.addr)
	target.accept(t)
	expectEOF(t, lowConn, "connection displaced after a failed attempt")
}

func TestAppMaxConnections(t *testing.T) {
	target := startHoldServer(t)
	web := startHTTPOrigin(t)
	network := newFakeNetwork(t)
	p := parsePolicy(t, limitsPolicy)
	s, addrs := startServerListeners(t, Config{Network: network}, p.Listeners)
	capped := addrs[3]

	first := openTunnel(t, capped, target.addr)
	firstTarget := target.accept(t)

	t.Run("socks5", func(t *testing.T) {
		c, code := socks5Reply(t, capped, target.addr)
		if code != replyNotAllowed {
			t.Errorf("reply %#x, want %#x (not allowed by ruleset)", code, replyNotAllowed)
		}
		expectEOF(t, c, "refused SOCKS5 client")
	})
	t.Run("http connect", func(t *testing.T) {
		resp, body, _, _ := rawExchange(t, capped, "CONNECT "+target.addr+" HTTP/1.1\r\nHost: "+target.addr+"\r\n\r\n")
		if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(body, "app connection limit reached (max_connections 1)") {
			t.Errorf("response %d %q, want 503 naming the app's limit", resp.StatusCode, body)
		}
	})
	t.Run("http get", func(t *testing.T) {
		resp, body, _, _ := rawExchange(t, capped, "GET http://"+web.addr+"/x HTTP/1.1\r\nHost: "+web.addr+"\r\n\r\n")
		if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(body, "app connection limit reached") {
			t.Errorf("response %d %q, want 503 naming the app's limit", resp.StatusCode, body)
		}
	})
	if got := len(s.Conns()); got != 1 {
		t.Errorf("table has %d rows, want the first connection alone", got)
	}

	// A pooled idle connection of the app gives way to a new request.
	first.Close()
	firstTarget.Close()
	waitFor(t, "the first connection to leave", func() bool { return len(s.Conns()) == 0 })
	client := proxyClient(t, "http://"+capped)
	if got := getBody(t, client, "http://"+web.addr+"/one"); got != "origin saw /one" {
		t.Fatalf("first GET body %q", got)
	}
	if got := len(s.Conns()); got != 1 {
		t.Fatalf("table has %d rows after a GET, want its pooled connection", got)
	}
	// Another host name needs another upstream connection.
	_, port, _ := net.SplitHostPort(web.addr)
	if got := getBody(t, client, "http://web.test:"+port+"/two"); got != "origin saw /two" {
		t.Errorf("second GET body %q", got)
	}
}

func TestIdleTimeout(t *testing.T) {
	target := startHoldServer(t)
	network := newFakeNetwork(t)
	p := testPolicy(t)
	var rec closeRecorder
	const idle = 300 * time.Millisecond
	s, addr := startServer(t, Config{Network: network, IdleTimeout: idle, OnClose: rec.record}, p.Listeners[0])

	quiet := openTunnel(t, addr, target.addr)
	target.accept(t)
	busy := openTunnel(t, addr, target.addr)
	busyTarget := target.accept(t)

	// busy moves a byte every 50ms, for three idle timeouts.
	start := time.Now()
	for time.Since(start) < 3*idle {
		busy.Write([]byte("."))
		readExactly(t, busyTarget, 1)
		time.Sleep(50 * time.Millisecond)
	}

	expectEOF(t, quiet, "idle tunnel")
	rows := s.Conns()
	if len(rows) != 1 {
		t.Fatalf("table %+v, want the busy tunnel alone", rows)
	}
	closed := rec.closed()
	if len(closed) != 1 || closed[0].Reason != "idle for 300ms" {
		t.Errorf("closed rows %+v, want the quiet one, idle for 300ms", closed)
	}
	if got := s.Stats().IdleClosed; got != 1 {
		t.Errorf("Stats().IdleClosed = %d, want 1", got)
	}
	busy.Write([]byte("!"))
	if got := readExactly(t, busyTarget, 1); string(got) != "!" {
		t.Errorf("busy tunnel carried %q, want !", got)
	}
}

// TestIdleKernelCopy checks that a transfer which the kernel copies in
// chunks bigger than what moves within the idle timeout is not taken for
// idle: its byte counts stand still between chunks.
func TestIdleKernelCopy(t *testing.T) {
	target := startHoldServer(t)
	network := newFakeNetwork(t)
	p := testPolicy(t)
	const idle = 200 * time.Millisecond
	s, addr := startServer(t, Config{Network: network, IdleTimeout: idle}, p.Listeners[0])

	c := openTunnel(t, addr, target.addr)
	tc := target.accept(t)
	start := time.Now()
	var sent int
	for time.Since(start) < 4*idle {
		c.Write(bytes.Repeat([]byte("k"), 1024)) // far below one copy chunk
		sent += 1024
		time.Sleep(40 * time.Millisecond)
	}
	c.CloseWrite()
	got, err := io.ReadAll(tc)
	if err != nil || len(got) != sent {
		t.Fatalf("target read %d bytes, %v, want %d and EOF", len(got), err, sent)
	}
	if n := s.Stats().IdleClosed; n != 0 {
		t.Errorf("Stats().IdleClosed = %d for a tunnel that moved bytes, want 0", n)
	}
}

func TestLocalTargetsRefused(t *testing.T) {
	echo := startEchoServer(t, "tcp4")
	_, port, _ := net.SplitHostPort(echo)
	hostAddr := netip.MustParseAddr("192.0.2.7") // stands for an address of this host
	isHostAddr := func(a netip.Addr) bool { return a == hostAddr }

	tests := []struct {
		name   string
		target string
	}{
		{name: "loopback literal", target: echo},
		{name: "loopback name", target: "web.test:" + port},
		{name: "loopback ipv6 name", target: "dual.test:" + port},
		{name: "link-local unspecified and mapped", target: "local.test:" + port},
		{name: "link-local literal", target: "169.254.1.1:" + port},
		{name: "link-local ipv6 literal", target: "[fe80::1]:" + port},
		{name: "unspecified literal", target: "0.0.0.0:" + port},
		{name: "this network literal", target: "0.1.2.3:" + port},
		{name: "unspecified ipv6 literal", target: "[::]:" + port},
		{name: "mapped loopback literal", target: "[::ffff:127.0.0.1]:" + port},
		{name: "host address", target: hostAddr.String() + ":" + port},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			network := newFakeNetwork(t)
			strict := testPolicy(t).Listeners[6]
			_, addr := startServer(t, Config{Network: network, IsHostAddr: isHostAddr}, strict)

			c, code := socks5Reply(t, addr, tt.target)
			if code != replyNotAllowed {
				t.Errorf("SOCKS5 reply %#x, want %#x (not allowed by ruleset)", code, replyNotAllowed)
			}
			expectEOF(t, c, "refused SOCKS5 client")

			resp, body, _, _ := rawExchange(t, addr, "CONNECT "+tt.target+" HTTP/1.1\r\nHost: "+tt.target+"\r\n\r\n")
			if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "set apps.strict.allow_local_targets to reach it") {
				t.Errorf("CONNECT response %d %q, want 403 naming allow_local_targets", resp.StatusCode, body)
			}
			resp, body, _, _ = rawExchange(t, addr, "GET http://"+tt.target+"/ HTTP/1.1\r\nHost: "+tt.target+"\r\n\r\n")
			if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "proxy: target is a local address") {
				t.Errorf("GET response %d %q, want 403 for a local target", resp.StatusCode, body)
			}
			if got := network.dials(); len(got) != 0 {
				t.Errorf("dials %q, want none", got)
			}
		})
	}
}

// TestLocalTargetsRebinding checks that a name whose answer mixes a local
// address with a remote one is dialled at the remote one only.
func TestLocalTargetsRebinding(t *testing.T) {
	network := newFakeNetwork(t)
	network.setDial("b", dialRefuse) // the remote address must not be reached
	strict := testPolicy(t).Listeners[6]
	_, addr := startServer(t, Config{Network: network}, strict)

	if _, code := socks5Reply(t, addr, "rebind.test:80"); code != replyConnectionRefused {
		t.Errorf("reply %#x, want %#x from the refused remote address", code, replyConnectionRefused)
	}
	if got, want := network.dials(), []string{"b 203.0.113.80:80"}; !slices.Equal(got, want) {
		t.Errorf("dials %q, want %q", got, want)
	}
}

func TestLocalTargetsAllowed(t *testing.T) {
	echo := startEchoServer(t, "tcp4")
	network := newFakeNetwork(t)
	_, addr := startServer(t, Config{Network: network}, testPolicy(t).Listeners[0])
	c := openTunnel(t, addr, echo)
	exchange(t, c, []byte("to loopback, allowed"))
}

func TestHTTPMaxHeaderBytes(t *testing.T) {
	tests := []struct {
		name       string
		max        int
		header     int // bytes of one header field's value
		wantStatus int
	}{
		{name: "within limit", max: 2048, header: 1000, wantStatus: http.StatusOK},
		// http.Server reads 4 KiB more than MaxHeaderBytes before it
		// refuses.
		{name: "over limit", max: 2048, header: 8000, wantStatus: http.StatusRequestHeaderFieldsTooLarge},
		{name: "over default", header: 80 << 10, wantStatus: http.StatusRequestHeaderFieldsTooLarge},
		{name: "within default", header: 50 << 10, wantStatus: http.StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bed := newHTTPTestBed(t, httpListenerApp, Config{MaxHeaderBytes: tt.max})
			target := bed.originTarget()
			req := "GET http://" + target + "/big HTTP/1.1\r\nHost: " + target + "\r\nX-Big: " + strings.Repeat("b", tt.header) + "\r\n\r\n"
			resp, _, _, _ := rawExchange(t, bed.proxy, req)
			if resp.StatusCode != tt.wantStatus {
				t.Errorf("status %d, want %d", resp.StatusCode, tt.wantStatus)
			}
			if n := len(bed.origin.requests()); (n == 1) != (tt.wantStatus == http.StatusOK) {
				t.Errorf("origin saw %d requests", n)
			}
		})
	}
}

func TestAuthFailureDelay(t *testing.T) {
	const delay = 100 * time.Millisecond

	t.Run("socks5", func(t *testing.T) {
		network := newFakeNetwork(t)
		s, addr := startServer(t, Config{Network: network, AuthFailureDelay: delay}, testPolicy(t).Listeners[1])
		attempt := func(password string) (byte, time.Duration) {
			c := dialProxy(t, addr)
			c.Write(greeting(methodUserPass))
			readExactly(t, c, 2)
			start := time.Now()
			c.Write(userPass("alice", password))
			status := readExactly(t, c, 2)[1]
			return status, time.Since(start)
		}

		// The first failure costs nothing extra; then the waits double. The
		// server counts each wait from its last failure, a little before
		// the client's next attempt starts, hence the margin.
		for i, wantMin := range []time.Duration{0, delay, 2 * delay, 4 * delay} {
			status, took := attempt("wrong")
			if status != 1 {
				t.Fatalf("attempt %d: status %d, want 1 (failure)", i, status)
			}
			if took < wantMin*9/10 || took > wantMin+time.Second {
				t.Errorf("attempt %d took %v, want at least %v", i, took, wantMin)
			}
		}
		// Another user from the same address is not slowed down.
		c := dialProxy(t, addr)
		c.Write(greeting(methodUserPass))
		readExactly(t, c, 2)
		start := time.Now()
		c.Write(userPass("bob", "bob-secret"))
		if status := readExactly(t, c, 2)[1]; status != 0 || time.Since(start) > delay {
			t.Errorf("bob after alice's failures: status %d after %v, want 0 at once", status, time.Since(start))
		}

		// The right password waits too, then clears the record.
		if status, took := attempt("alice-secret"); status != 0 || took < 8*delay*9/10 {
			t.Errorf("right password: status %d after %v, want 0 after at least %v", status, took, 8*delay)
		}
		if status, took := attempt("alice-secret"); status != 0 || took > delay {
			t.Errorf("after success: status %d after %v, want 0 at once", status, took)
		}
		st := s.Stats()
		if st.AuthFailures != 4 || st.AuthDelayed != 4 {
			t.Errorf("Stats() failures %d, delayed %d; want 4 and 4", st.AuthFailures, st.AuthDelayed)
		}
	})

	t.Run("http", func(t *testing.T) {
		bed := newHTTPTestBed(t, httpListenerUsers, Config{AuthFailureDelay: delay})
		target := bed.originTarget()
		attempt := func(header string) (int, time.Duration) {
			start := time.Now()
			resp, _, _, _ := rawExchange(t, bed.proxy, "GET http://"+target+"/ HTTP/1.1\r\nHost: "+target+"\r\n"+header+"\r\n")
			return resp.StatusCode, time.Since(start)
		}
		wrong := "Proxy-Authorization: " + basicCredentials("Basic", "alice", "wrong") + "\r\n"
		if status, _ := attempt(""); status != http.StatusProxyAuthRequired {
			t.Fatalf("no credentials: status %d, want 407", status)
		}
		// A request without credentials is no failure: no wait follows.
		if status, took := attempt(wrong); status != http.StatusProxyAuthRequired || took > delay {
			t.Errorf("first wrong password: status %d after %v, want 407 at once", status, took)
		}
		if status, took := attempt(wrong); status != http.StatusProxyAuthRequired || took < delay*9/10 {
			t.Errorf("second wrong password: status %d after %v, want 407 after at least %v", status, took, delay)
		}
		// Malformed credentials count for the empty user name.
		if status, took := attempt("Proxy-Authorization: garbage\r\n"); status != http.StatusProxyAuthRequired || took > delay {
			t.Errorf("first malformed credentials: status %d after %v, want 407 at once", status, took)
		}
		if status, took := attempt("Proxy-Authorization: garbage\r\n"); status != http.StatusProxyAuthRequired || took < delay*9/10 {
			t.Errorf("second malformed credentials: status %d after %v, want 407 after at least %v", status, took, delay)
		}
	})
}

func TestAuthThrottle(t *testing.T) {
	const base = 40 * time.Millisecond
	a := newAuthThrottle()
	a.setBase(base)
	client := netip.MustParseAddr("2001:db8::5")
	neighbour := netip.MustParseAddr("2001:db8::6")  // same /64
	stranger := netip.MustParseAddr("2001:db8:1::5") // another /64

	if ok, delayed := a.wait(t.Context(), client, "alice", time.Time{}); !ok || delayed {
		t.Fatalf("wait before any failure = %v, %v; want true, false", ok, delayed)
	}
	for range 6 {
		a.failed(client, "alice")
	}
	if got, want := a.delay(6), 16*base; got != want {
		t.Errorf("delay after 6 failures = %v, want the cap %v", got, want)
	}
	if ok, delayed := a.wait(t.Context(), stranger, "alice", time.Time{}); !ok || delayed {
		t.Errorf("wait of another /64 = %v, %v; want true, false", ok, delayed)
	}
	if ok, delayed := a.wait(t.Context(), client, "bob", time.Time{}); !ok || delayed {
		t.Errorf("wait of another user from the same address = %v, %v; want true, false", ok, delayed)
	}
	if got, want := newAuthKey(client, "alice+cell"), newAuthKey(neighbour, "alice"); got != want {
		t.Errorf("key of alice+cell = %v, want alice's %v: a choice must not start a fresh count", got, want)
	}

	// Attempts that arrive together are spaced out, and an attempt whose
	// turn would come after its deadline is refused at once.
	start := time.Now()
	if ok, delayed := a.wait(t.Context(), neighbour, "alice", time.Time{}); !ok || !delayed {
		t.Errorf("wait of the same /64 = %v, %v; want true, true", ok, delayed)
	}
	if took := time.Since(start); took < 16*base*9/10 {
		t.Errorf("first wait took %v, want about %v", took, 16*base)
	}
	start = time.Now()
	if ok, _ := a.wait(t.Context(), client, "alice", time.Now().Add(base)); ok {
		t.Errorf("wait past its deadline = true, want false")
	}
	if took := time.Since(start); took > base {
		t.Errorf("refused wait took %v, want no wait", took)
	}

	a.succeeded(client, "alice")
	if ok, delayed := a.wait(t.Context(), client, "alice", time.Time{}); !ok || delayed {
		t.Errorf("wait after success = %v, %v; want true, false", ok, delayed)
	}
	off := newAuthThrottle()
	off.failed(client, "alice")
	if ok, delayed := off.wait(t.Context(), client, "alice", time.Time{}); !ok || delayed {
		t.Errorf("wait with the delay off = %v, %v; want true, false", ok, delayed)
	}
}

// TestPanicInConnection checks that a panic while serving one client ends
// that client's connection only.
func TestPanicInConnection(t *testing.T) {
	echo := startEchoServer(t, "tcp4")
	tests := []struct {
		name      string
		listener  int
		behaviour dialBehaviour
		client    func(t *testing.T, addr string)
	}{
		{
			name: "socks5 dial", listener: 0, behaviour: dialPanic,
			client: func(t *testing.T, addr string) {
				c, code := socks5Reply(t, addr, echo)
				if code != replyHostUnreachable {
					t.Errorf("reply %#x, want %#x (host unreachable)", code, replyHostUnreachable)
				}
				expectEOF(t, c, "client whose dial panicked")
			},
		},
		{
			name: "socks5 relay", listener: 0, behaviour: dialPanicRead,
			client: func(t *testing.T, addr string) {
				c := openTunnel(t, addr, echo)
				c.Write([]byte("x"))
				c.CloseWrite()
				expectEOF(t, c, "client whose relay panicked")
			},
		},
		{
			name: "http connect dial", listener: httpListenerApp, behaviour: dialPanic,
			client: func(t *testing.T, addr string) {
				resp, body, _, _ := rawExchange(t, addr, "CONNECT "+echo+" HTTP/1.1\r\nHost: "+echo+"\r\n\r\n")
				if resp.StatusCode != http.StatusBadGateway || !strings.Contains(body, "proxy: internal error") {
					t.Errorf("response %d %q, want 502 with the internal error", resp.StatusCode, body)
				}
			},
		},
		{
			name: "http get dial", listener: httpListenerApp, behaviour: dialPanic,
			client: func(t *testing.T, addr string) {
				resp, body, _, _ := rawExchange(t, addr, "GET http://"+echo+"/ HTTP/1.1\r\nHost: "+echo+"\r\n\r\n")
				if resp.StatusCode != http.StatusBadGateway || !strings.Contains(body, "proxy: internal error") {
					t.Errorf("response %d %q, want 502 with the internal error", resp.StatusCode, body)
				}
			},
		},
		{
			name: "mixed connect relay", listener: httpListenerMixed, behaviour: dialPanicRead,
			client: func(t *testing.T, addr string) {
				resp, _, c, r := rawExchange(t, addr, "CONNECT "+echo+" HTTP/1.1\r\nHost: "+echo+"\r\n\r\n")
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("CONNECT status %d, want 200", resp.StatusCode)
				}
				c.Write([]byte("x"))
				c.(*net.TCPConn).CloseWrite()
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				if rest, _ := io.ReadAll(r); len(rest) > 0 {
					t.Errorf("client read %q from a tunnel whose relay panicked, want nothing", rest)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			network := newFakeNetwork(t)
			network.setDial("a", tt.behaviour)
			network.setDial("b", tt.behaviour)
			s, addr := startServer(t, Config{Network: network, DialTimeout: 2 * time.Second}, testPolicy(t).Listeners[tt.listener])

			tt.client(t, addr)
			waitFor(t, "the panic to be counted", func() bool { return s.Stats().Panics > 0 })

			// The server goes on serving.
			network.setDial("a", dialOK)
			network.setDial("b", dialOK)
			if tt.listener == 0 {
				exchange(t, openTunnel(t, addr, echo), []byte("after the panic"))
				return
			}
			resp, _, c, r := rawExchange(t, addr, "CONNECT "+echo+" HTTP/1.1\r\nHost: "+echo+"\r\n\r\n")
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("CONNECT after the panic: status %d, want 200", resp.StatusCode)
			}
			c.Write([]byte("after the panic"))
			c.(*net.TCPConn).CloseWrite()
			if got, _ := io.ReadAll(r); string(got) != "echo:after the panic" {
				t.Errorf("echo after the panic %q", got)
			}
		})
	}
}

// gatedListener holds Accept until open is closed, so that a test can
// queue connections in the kernel's backlog before the server takes them.
type gatedListener struct {
	net.Listener
	open chan struct{}
}

func (l *gatedListener) Accept() (net.Conn, error) {
	<-l.open
	return l.Listener.Accept()
}

// errListener fails every Accept with err until the count runs out, then
// accepts from the real listener.
type errListener struct {
	net.Listener
	err error

	mu    sync.Mutex
	left  int         // guarded by mu
	calls []time.Time // guarded by mu
}

func (l *errListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	l.calls = append(l.calls, time.Now())
	fail := l.left > 0
	l.left--
	l.mu.Unlock()
	if fail {
		return nil, l.err
	}
	return l.Listener.Accept()
}

func TestAcceptBackoff(t *testing.T) {
	echo := startEchoServer(t, "tcp4")
	tests := []struct {
		name string
		err  error
	}{
		{name: "emfile", err: &net.OpError{Op: "accept", Net: "tcp", Err: &net.OpError{Err: syscall.EMFILE}}},
		{name: "enfile", err: &net.OpError{Op: "accept", Net: "tcp", Err: syscall.ENFILE}},
		{name: "enobufs", err: &net.OpError{Op: "accept", Net: "tcp", Err: syscall.ENOBUFS}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatalf("listening: %v", err)
			}
			fl := &errListener{Listener: ln, err: tt.err, left: 6}
			s := NewServer(Config{Network: newFakeNetwork(t), Logger: newTestLogger(t)})
			served := make(chan error, 1)
			go func() { served <- s.Serve(fl, testPolicy(t).Listeners[0]) }()
			defer func() {
				s.Close()
				if err := <-served; err != nil {
					t.Errorf("Serve: %v", err)
				}
			}()

			// Six failures wait 5+10+20+40+80+160 ms in all, then the
			// listener serves.
			exchange(t, openTunnel(t, ln.Addr().String(), echo), []byte("after the failures"))
			fl.mu.Lock()
			calls := slices.Clone(fl.calls)
			fl.mu.Unlock()
			if took := calls[6].Sub(calls[0]); took < 300*time.Millisecond {
				t.Errorf("six failed accepts over %v, want at least 300ms of backing off", took)
			}
			if got := s.Stats().AcceptRetries; got != 6 {
				t.Errorf("Stats().AcceptRetries = %d, want 6", got)
			}
		})
	}

	t.Run("close while backing off", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("listening: %v", err)
		}
		fl := &errListener{Listener: ln, err: tests[0].err, left: 1 << 30}
		s := NewServer(Config{Network: newFakeNetwork(t), Logger: newTestLogger(t)})
		served := make(chan error, 1)
		go func() { served <- s.Serve(fl, testPolicy(t).Listeners[0]) }()
		waitFor(t, "a few retries", func() bool { return s.Stats().AcceptRetries >= 8 })
		start := time.Now()
		s.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if took := time.Since(start); took > 500*time.Millisecond {
			t.Errorf("Close took %v while backing off, want it at once", took)
		}
	})

	t.Run("other errors end the listener", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("listening: %v", err)
		}
		fl := &errListener{Listener: ln, err: errors.New("listener broken"), left: 1}
		s := NewServer(Config{Network: newFakeNetwork(t), Logger: newTestLogger(t)})
		defer s.Close()
		if err := s.Serve(fl, testPolicy(t).Listeners[0]); err == nil || err.Error() != "accepting on 127.0.0.1:0: listener broken" {
			t.Errorf("Serve = %v, want accepting on 127.0.0.1:0: listener broken", err)
		}
	})
}

// TestSetLimits checks that new limits, as a reload sets them, apply to
// connections from then on and wake the idle sweep.
func TestSetLimits(t *testing.T) {
	target := startHoldServer(t)
	network := newFakeNetwork(t)
	s, addr := startServer(t, Config{Network: network}, testPolicy(t).Listeners[0])

	quiet := openTunnel(t, addr, target.addr)
	target.accept(t)
	s.SetLimits(policy.Limits{IdleTimeout: 200 * time.Millisecond, HandshakeTimeout: 300 * time.Millisecond})
	start := time.Now()
	expectEOF(t, quiet, "tunnel idle under the new idle timeout")
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("idle tunnel closed after %v, want within about 200ms of the new limit", took)
	}

	stalled := dialProxy(t, addr)
	stalled.Write([]byte{5, 1})
	start = time.Now()
	expectEOF(t, stalled, "stalled greeting under the new handshake timeout")
	if took := time.Since(start); took < 250*time.Millisecond || took > 2*time.Second {
		t.Errorf("stalled client closed after %v, want about the new 300ms", took)
	}

	got := s.currentLimits()
	want := policy.Limits{HandshakeTimeout: 300 * time.Millisecond, DialTimeout: DefaultDialTimeout, IdleTimeout: 200 * time.Millisecond, MaxHeaderBytes: DefaultMaxHeaderBytes}
	if *got != want {
		t.Errorf("limits %+v, want %+v with the defaults filled in", *got, want)
	}
}

// TestUpdateListenerLimits checks that a listener updated by a reload
// applies its new client ranges and cap to the next clients.
func TestUpdateListenerLimits(t *testing.T) {
	target := startHoldServer(t)
	network := newFakeNetwork(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening: %v", err)
	}
	s := NewServer(Config{Network: network, Logger: newTestLogger(t)})
	served := make(chan error, 1)
	l := *testPolicy(t).Listeners[0]
	go func() { served <- s.Serve(ln, &l) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	addr := ln.Addr().String()
	openTunnel(t, addr, target.addr)
	target.accept(t)

	capped := l
	capped.MaxConnections = 1
	if err := s.Update(ln, &capped); err != nil {
		t.Fatalf("Update: %v", err)
	}
	expectEOF(t, dialProxy(t, addr), "second client of a listener capped at 1 by a reload")

	elsewhere := l
	elsewhere.AllowClients = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	if err := s.Update(ln, &elsewhere); err != nil {
		t.Fatalf("Update: %v", err)
	}
	expectEOF(t, dialProxy(t, addr), "client outside the ranges of a reload")
	if st := s.Stats(); st.ListenerFull != 1 || st.ClientsRefused != 1 {
		t.Errorf("Stats() listener full %d, clients refused %d; want 1 and 1", st.ListenerFull, st.ClientsRefused)
	}
}
