package proxy

import (
	"bytes"
	"errors"
	"io"
	"net"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"
)

// holdServer is a target that lets the test drive its side of one
// connection at a time.
type holdServer struct {
	addr  string
	conns chan *net.TCPConn
}

func startHoldServer(t *testing.T) *holdServer {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening: %v", err)
	}
	h := &holdServer{addr: ln.Addr().String(), conns: make(chan *net.TCPConn, 4)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			h.conns <- c.(*net.TCPConn)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		close(h.conns)
		for c := range h.conns {
			c.Close()
		}
	})
	return h
}

// accept returns the target side of the next connection.
func (h *holdServer) accept(t *testing.T) *net.TCPConn {
	t.Helper()
	select {
	case c := <-h.conns:
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(5 * time.Second):
		t.Fatal("timed out waiting for the proxy to connect to the target")
		return nil
	}
}

// openTunnel connects through the SOCKS5 proxy at addr to target.
func openTunnel(t *testing.T, addr, target string) *net.TCPConn {
	t.Helper()
	c := dialProxy(t, addr)
	c.Write(append(greeting(methodNoAuth), request(t, 1, target)...))
	readExactly(t, c, 2)
	readSuccess(t, c)
	return c
}

// closeRecorder collects the rows that Config.OnClose reports.
type closeRecorder struct {
	mu   sync.Mutex
	rows []ConnInfo
}

func (r *closeRecorder) record(ci ConnInfo) {
	r.mu.Lock()
	r.rows = append(r.rows, ci)
	r.mu.Unlock()
}

func (r *closeRecorder) closed() []ConnInfo {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.rows)
}

func TestConnectionTable(t *testing.T) {
	target := startHoldServer(t)
	network := newFakeNetwork(t)
	p := testPolicy(t)
	var rec closeRecorder
	s, addr := startServer(t, Config{Network: network, OnClose: rec.record}, p.Listeners[0])

	before := time.Now()
	c := openTunnel(t, addr, target.addr)
	tc := target.accept(t)

	// The row is there while the tunnel lives.
	rows := s.Conns()
	if len(rows) != 1 {
		t.Fatalf("table has %d rows, want 1: %+v", len(rows), rows)
	}
	row := rows[0]
	want := ConnInfo{ID: row.ID, App: "web", Listener: "127.0.0.1:0", Target: target.addr, Destination: "internet", AccessPoint: "a", Interface: "eth-a", Started: row.Started}
	if row != want {
		t.Errorf("row %+v, want %+v", row, want)
	}
	if row.Started.Before(before) || row.Started.After(time.Now()) {
		t.Errorf("row started at %v, want between %v and now", row.Started, before)
	}

	// Traffic both ways, then the client half-closes and the target
	// closes: the tunnel ends and its counts are final.
	c.Write([]byte("ping"))
	if got := readExactly(t, tc, 4); string(got) != "ping" {
		t.Fatalf("target read %q, want ping", got)
	}
	tc.Write([]byte("pong!!"))
	if got := readExactly(t, c, 6); string(got) != "pong!!" {
		t.Fatalf("client read %q, want pong!!", got)
	}
	c.CloseWrite()
	if rest, err := io.ReadAll(tc); err != nil || len(rest) > 0 {
		t.Fatalf("target read %q, %v after the half-close, want EOF", rest, err)
	}
	tc.Close()
	if rest, err := io.ReadAll(c); err != nil || len(rest) > 0 {
		t.Fatalf("client read %q, %v at the end, want EOF", rest, err)
	}

	waitFor(t, "the row to leave the table", func() bool { return len(s.Conns()) == 0 })
	closed := rec.closed()
	if len(closed) != 1 {
		t.Fatalf("OnClose saw %d rows, want 1", len(closed))
	}
	want.BytesUp, want.BytesDown = 4, 6
	if closed[0] != want {
		t.Errorf("closed row %+v, want %+v", closed[0], want)
	}
}

func TestSOCKS5HalfClose(t *testing.T) {
	target := startHoldServer(t)
	network := newFakeNetwork(t)
	p := testPolicy(t)
	s, addr := startServer(t, Config{Network: network}, p.Listeners[0])

	c := openTunnel(t, addr, target.addr)
	tc := target.accept(t)

	// The client's half-close reaches the target as EOF.
	c.Write([]byte("request"))
	c.CloseWrite()
	got, err := io.ReadAll(tc)
	if err != nil || string(got) != "request" {
		t.Fatalf("target read %q, %v, want request and EOF", got, err)
	}

	// The target can still send, after a pause, and its half-close
	// reaches the client as EOF.
	time.Sleep(50 * time.Millisecond)
	tc.Write([]byte("late answer"))
	tc.CloseWrite()
	got, err = io.ReadAll(c)
	if err != nil || string(got) != "late answer" {
		t.Fatalf("client read %q, %v, want the late answer and EOF", got, err)
	}

	// Both of the proxy's sockets are closed once both directions ended.
	waitFor(t, "the upstream to close", func() bool { return len(s.Conns()) == 0 })
	waitFor(t, "the client connection to close", func() bool { return servedClients(s) == 0 })
}

func TestServerCloseEndsTunnels(t *testing.T) {
	target := startHoldServer(t)
	network := newFakeNetwork(t)
	p := testPolicy(t)
	s, addr := startServer(t, Config{Network: network}, p.Listeners[0])

	c := openTunnel(t, addr, target.addr)
	tc := target.accept(t)
	c.Write([]byte("x"))
	readExactly(t, tc, 1)

	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if rest, _ := io.ReadAll(c); len(rest) > 0 {
		t.Errorf("client read %q after Close, want nothing", rest)
	}
	if rest, _ := io.ReadAll(tc); len(rest) > 0 {
		t.Errorf("target read %q after Close, want nothing", rest)
	}
	if rows := s.Conns(); len(rows) != 0 {
		t.Errorf("table has %+v after Close, want no rows", rows)
	}
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Errorf("listener still accepts after Close")
	}
}

func TestServerCloseStopsDial(t *testing.T) {
	network := newFakeNetwork(t)
	network.setDial("a", dialHang)
	network.setDial("b", dialHang)
	p := testPolicy(t)
	s, addr := startServer(t, Config{Network: network, DialTimeout: time.Minute}, p.Listeners[0])

	c := dialProxy(t, addr)
	c.Write(append(greeting(methodNoAuth), request(t, 1, "web.test:80")...))
	readExactly(t, c, 2)
	waitFor(t, "the dial to start", func() bool { return len(network.dials()) == 1 })

	start := time.Now()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("Close took %v with a dial in progress, want it to cancel the dial", took)
	}
	if rest, _ := io.ReadAll(c); len(rest) > 0 {
		t.Errorf("client read % x after Close, want nothing", rest)
	}
}

func TestCloseAccessPoint(t *testing.T) {
	target := startHoldServer(t)
	network := newFakeNetwork(t)
	p := testPolicy(t)
	s, addr := startServer(t, Config{Network: network}, p.Listeners[0])

	c := openTunnel(t, addr, target.addr)
	target.accept(t)

	if n := s.CloseAccessPoint("b"); n != 0 {
		t.Errorf("CloseAccessPoint(b) = %d, want 0", n)
	}
	if n := s.CloseAccessPoint("a"); n != 1 {
		t.Errorf("CloseAccessPoint(a) = %d, want 1", n)
	}
	if rest, _ := io.ReadAll(c); len(rest) > 0 {
		t.Errorf("client read %q, want the tunnel closed", rest)
	}
	if rows := s.Conns(); len(rows) != 0 {
		t.Errorf("table has %+v, want no rows", rows)
	}
}

// TestRelayKernelCopy checks which copy path each direction of a tunnel
// took, by the relayCopies counters that the path choice increments. Not
// parallel: the counters are shared.
func TestRelayKernelCopy(t *testing.T) {
	echo := startEchoServer(t, "tcp4")
	onLinux := runtime.GOOS == "linux"

	tests := []struct {
		name       string
		listener   int
		wantKernel int64
		wantUser   int64
	}{
		{name: "socks5 listener", listener: 0, wantKernel: 2},
		// The mixed listener peeks with MSG_PEEK on Linux and keeps the raw
		// socket; elsewhere it buffers the first byte and copies in user
		// space.
		{name: "mixed listener", listener: 2, wantKernel: map[bool]int64{true: 2}[onLinux], wantUser: map[bool]int64{false: 2}[onLinux]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			network := newFakeNetwork(t)
			p := testPolicy(t)
			var rec closeRecorder
			s, addr := startServer(t, Config{Network: network, OnClose: rec.record}, p.Listeners[tt.listener])

			kernel, user := relayCopies.Kernel.Load(), relayCopies.User.Load()
			c := openTunnel(t, addr, echo)
			payload := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB: several chunks
			exchange(t, c, payload)
			waitFor(t, "the tunnel to end", func() bool { return len(s.Conns()) == 0 })

			if got := relayCopies.Kernel.Load() - kernel; got != tt.wantKernel {
				t.Errorf("kernel copies %d, want %d", got, tt.wantKernel)
			}
			if got := relayCopies.User.Load() - user; got != tt.wantUser {
				t.Errorf("user-space copies %d, want %d", got, tt.wantUser)
			}
			closed := rec.closed()
			if len(closed) != 1 || closed[0].BytesUp != int64(len(payload)) || closed[0].BytesDown != int64(len(payload)+5) {
				t.Errorf("closed rows %+v, want one with %d bytes up and %d down", closed, len(payload), len(payload)+5)
			}
		})
	}
}

// hiddenTCP hides the *net.TCPConn type of a connection but keeps its
// half-close, like a connection wrapped by another library.
type hiddenTCP struct{ net.Conn }

func (h hiddenTCP) CloseWrite() error { return h.Conn.(*net.TCPConn).CloseWrite() }

func TestRelay(t *testing.T) {
	echo := startEchoServer(t, "tcp4")

	tests := []struct {
		name       string
		hide       bool // hand relay the client wrapped in hiddenTCP
		wantKernel int64
		wantUser   int64
	}{
		{name: "tcp client", wantKernel: 2},
		{name: "wrapped client", hide: true, wantUser: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			network := newFakeNetwork(t)
			p := testPolicy(t)
			var rec closeRecorder
			s := NewServer(Config{Network: network, Logger: newTestLogger(t), OnClose: rec.record})
			defer s.Close()

			ln, err := net.Listen("tcp4", "127.0.0.1:0")
			if err != nil {
				t.Fatalf("listening: %v", err)
			}
			client, err := net.Dial("tcp4", ln.Addr().String())
			if err != nil {
				t.Fatalf("dialling: %v", err)
			}
			defer client.Close()
			client.SetDeadline(time.Now().Add(10 * time.Second))
			var proxySide net.Conn
			proxySide, err = ln.Accept()
			ln.Close()
			if err != nil {
				t.Fatalf("accepting: %v", err)
			}
			if tt.hide {
				proxySide = hiddenTCP{proxySide}
			}

			ap := p.AccessPoints["a"]
			conn, err := s.dialAccessPoint(t.Context(), p.Apps["web"], ap, echo)
			if err != nil {
				t.Fatalf("dialAccessPoint: %v", err)
			}
			up := s.track(conn, p.Apps["web"], p.Apps["web"].Destination, nil, echo, ap, claim{})

			kernel, user := relayCopies.Kernel.Load(), relayCopies.User.Load()
			relayed := make(chan error, 1)
			s.startRelayNotify(proxySide, up, func(err error) { relayed <- err })

			client.Write([]byte("through relay"))
			client.(*net.TCPConn).CloseWrite()
			got, err := io.ReadAll(client)
			if err != nil {
				t.Fatalf("reading: %v", err)
			}
			if string(got) != "echo:through relay" {
				t.Errorf("client read %q, want echo:through relay", got)
			}
			if err := <-relayed; err != nil {
				t.Errorf("relay: %v", err)
			}

			if got := relayCopies.Kernel.Load() - kernel; got != tt.wantKernel {
				t.Errorf("kernel copies %d, want %d", got, tt.wantKernel)
			}
			if got := relayCopies.User.Load() - user; got != tt.wantUser {
				t.Errorf("user-space copies %d, want %d", got, tt.wantUser)
			}
			closed := rec.closed()
			if len(closed) != 1 || closed[0].BytesUp != 13 || closed[0].BytesDown != 18 {
				t.Errorf("closed rows %+v, want one with 13 bytes up and 18 down", closed)
			}
		})
	}
}

func TestCloseAccessPointResetsStalledClient(t *testing.T) {
	// A target that sends without end, to a client that does not read, so
	// that the relay is blocked writing to the client when the access
	// point goes away.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		chunk := make([]byte, 64<<10)
		for {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
	}()

	network := newFakeNetwork(t)
	p := testPolicy(t)
	s, addr := startServer(t, Config{Network: network}, p.Listeners[0])
	c := dialProxy(t, addr)
	c.Write(slices.Concat(greeting(methodNoAuth), request(t, 1, ln.Addr().String())))
	readExactly(t, c, 2+10)
	waitFor(t, "the relay to fill the client's buffers", func() bool {
		conns := s.Conns()
		return len(conns) == 1 && conns[0].BytesDown > 1<<20
	})

	if n := s.CloseAccessPoint("a"); n != 1 {
		t.Fatalf("CloseAccessPoint closed %d connections, want 1", n)
	}

	// The client reads what was already delivered, then must see a reset,
	// not a clean end of stream that would pass a cut download as whole.
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = io.Copy(io.Discard, c)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("client read ended with %v, want a connection reset", err)
	}
}
