package proxy

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"iapd/policy"
)

// testListener is a listener socket served by a Server in a test, with
// the result of Serve.
type testListener struct {
	ln     net.Listener
	addr   string
	served chan error
}

// serveListener serves l on a new loopback socket of s.
func serveListener(t *testing.T, s *Server, l *policy.Listener) *testListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening: %v", err)
	}
	tl := &testListener{ln: ln, addr: ln.Addr().String(), served: make(chan error, 1)}
	go func() { tl.served <- s.Serve(ln, l) }()
	waitFor(t, "Serve to take the listener", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		_, ok := s.listeners[ln]
		return ok
	})
	return tl
}

// newLifecycleServer returns a server over a fake network that is closed
// in t.Cleanup.
func newLifecycleServer(t *testing.T, cfg Config) *Server {
	t.Helper()
	if cfg.Network == nil {
		cfg.Network = newFakeNetwork(t)
	}
	cfg.Logger = newTestLogger(t)
	s := NewServer(cfg)
	t.Cleanup(func() { s.Close() })
	return s
}

// startLineEcho listens on loopback and echoes every line back on each
// connection until the client closes, so that a tunnel through it can be
// used again and again.
func startLineEcho(t *testing.T) string {
	t.Helper()
	return startLoopbackServer(t, func(c net.Conn) {
		defer c.Close()
		io.Copy(c, c)
	})
}

// startLoopbackServer listens on 127.0.0.1 and runs handle on a goroutine
// of its own for each connection. When the test ends it closes the
// listener and every connection and waits for the handlers to return.
func startLoopbackServer(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening: %v", err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() { handle(c) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// openSOCKS5Tunnel opens a SOCKS5 tunnel without authentication to target
// through the proxy at addr.
func openSOCKS5Tunnel(t *testing.T, addr, target string) (*net.TCPConn, *bufio.Reader) {
	t.Helper()
	c := dialProxy(t, addr)
	c.Write(greeting(methodNoAuth))
	if got := readExactly(t, c, 2); got[1] != methodNoAuth {
		t.Fatalf("method reply % x, want no authentication", got)
	}
	c.Write(request(t, 1, target))
	readSuccess(t, c)
	return c, bufio.NewReader(c)
}

// roundTripLine writes line into a tunnel to a line echo server and checks
// that it comes back.
func roundTripLine(t *testing.T, c net.Conn, r *bufio.Reader, line string) {
	t.Helper()
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		t.Fatalf("writing %q into the tunnel: %v", line, err)
	}
	got, err := r.ReadString('\n')
	if err != nil || got != line+"\n" {
		t.Fatalf("tunnel echoed %q, %v; want %q", got, err, line+"\n")
	}
}

func connApps(s *Server) []string {
	var apps []string
	for _, c := range s.Conns() {
		apps = append(apps, c.App+"@"+c.AccessPoint)
	}
	return apps
}

func TestUpdateListenerKeepsOpenTunnels(t *testing.T) {
	p := testPolicy(t)
	s := newLifecycleServer(t, Config{})
	echo := startLineEcho(t)
	tl := serveListener(t, s, p.Listeners[0]) // socks5, app web over a

	old, oldReader := openSOCKS5Tunnel(t, tl.addr, echo)
	roundTripLine(t, old, oldReader, "before")

	// The same socket now identifies its clients as app mail, which uses
	// access point b.
	if err := s.Update(tl.ln, p.Listeners[5]); err != nil {
		t.Fatalf("Update: %v", err)
	}
	fresh, freshReader := openSOCKS5Tunnel(t, tl.addr, echo)
	roundTripLine(t, fresh, freshReader, "new")
	roundTripLine(t, old, oldReader, "after")

	if got, want := connApps(s), []string{"web@a", "mail@b"}; !slices.Equal(got, want) {
		t.Errorf("connections %q, want %q", got, want)
	}
	// The socket counts the clients of both policy listeners.
	if st, ok := s.ListenerStats(tl.ln); !ok || st.Connections != 2 {
		t.Errorf("ListenerStats() = %+v, %v; want 2 connections, true", st, ok)
	}
}

func TestUpdateListenerChangesProtocol(t *testing.T) {
	p := testPolicy(t)
	s := newLifecycleServer(t, Config{})
	echo := startLineEcho(t)
	tl := serveListener(t, s, p.Listeners[3]) // http, app web

	resp, _, tunnel, tunnelReader := rawExchange(t, tl.addr, "CONNECT "+echo+" HTTP/1.1\r\nHost: "+echo+"\r\n\r\n")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT status %d, want 200", resp.StatusCode)
	}
	roundTripLine(t, tunnel, tunnelReader, "before")

	// From now on the socket speaks SOCKS5, while the HTTP tunnel stays.
	if err := s.Update(tl.ln, p.Listeners[5]); err != nil {
		t.Fatalf("Update: %v", err)
	}
	fresh, freshReader := openSOCKS5Tunnel(t, tl.addr, echo)
	roundTripLine(t, fresh, freshReader, "new")
	roundTripLine(t, tunnel, tunnelReader, "after")

	if got, want := connApps(s), []string{"web@a", "mail@b"}; !slices.Equal(got, want) {
		t.Errorf("connections %q, want %q", got, want)
	}

	// The replaced HTTP front end closes once its last tunnel has ended.
	tunnel.Close()
	waitFor(t, "the replaced HTTP front end to close", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.frontends) == 1
	})
}

func TestUpdateUnservedListener(t *testing.T) {
	p := testPolicy(t)
	s := newLifecycleServer(t, Config{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	err = s.Update(ln, p.Listeners[0])
	if !errors.Is(err, ErrNotServed) || err.Error() != "updating 127.0.0.1:0: proxy: listener not served" {
		t.Errorf("Update = %v, want ErrNotServed", err)
	}
	if err := s.Retire(ln); !errors.Is(err, ErrNotServed) {
		t.Errorf("Retire = %v, want ErrNotServed", err)
	}
}

func TestRetireDrainsConnections(t *testing.T) {
	p := testPolicy(t)
	s := newLifecycleServer(t, Config{})
	echo := startLineEcho(t)
	tl := serveListener(t, s, p.Listeners[2]) // mixed, app web

	c, r := openSOCKS5Tunnel(t, tl.addr, echo)
	if err := s.Retire(tl.ln); err != nil {
		t.Fatalf("Retire: %v", err)
	}
	select {
	case err := <-tl.served:
		if err != nil {
			t.Errorf("Serve returned %v after Retire, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after Retire")
	}
	if st, ok := s.ListenerStats(tl.ln); ok {
		t.Errorf("ListenerStats() of a retired listener = %+v, true; want false", st)
	}

	if conn, err := net.DialTimeout("tcp", tl.addr, time.Second); err == nil {
		conn.Close()
		t.Errorf("a retired listener still accepts connections")
	}
	roundTripLine(t, c, r, "still open")
}

func TestShutdown(t *testing.T) {
	tests := []struct {
		name       string
		closeFirst bool // the client ends its tunnel during the drain
		wantErr    error
	}{
		{name: "connections end in time", closeFirst: true},
		{name: "connections outlast the timeout", wantErr: context.DeadlineExceeded},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := testPolicy(t)
			s := newLifecycleServer(t, Config{})
			echo := startLineEcho(t)
			tl := serveListener(t, s, p.Listeners[0])
			c, r := openSOCKS5Tunnel(t, tl.addr, echo)

			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			defer cancel()
			done := make(chan error, 1)
			go func() { done <- s.Shutdown(ctx) }()

			waitFor(t, "the listener to stop accepting", func() bool {
				conn, err := net.DialTimeout("tcp", tl.addr, time.Second)
				if err == nil {
					conn.Close()
				}
				return err != nil
			})
			roundTripLine(t, c, r, "during the drain")
			if tt.closeFirst {
				c.Close()
			}

			err := <-done
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("Shutdown = %v, want %v", err, tt.wantErr)
			}
			if n := len(s.Conns()); n != 0 {
				t.Errorf("%d connections left after Shutdown", n)
			}
			if err := <-tl.served; err != nil {
				t.Errorf("Serve returned %v, want nil", err)
			}
			if !tt.closeFirst {
				if _, err := r.ReadString('\n'); err == nil {
					t.Errorf("the tunnel is still open after the drain timeout")
				}
			}
		})
	}
}

func TestCloseConn(t *testing.T) {
	p := testPolicy(t)
	s := newLifecycleServer(t, Config{})
	echo := startLineEcho(t)
	tl := serveListener(t, s, p.Listeners[0])
	c, r := openSOCKS5Tunnel(t, tl.addr, echo)
	roundTripLine(t, c, r, "open")

	id := s.Conns()[0].ID
	if s.CloseConn(id + 100) {
		t.Errorf("CloseConn(%d) = true for an unknown ID", id+100)
	}
	if !s.CloseConn(id) {
		t.Fatalf("CloseConn(%d) = false, want true", id)
	}
	if _, err := r.ReadString('\n'); err == nil {
		t.Errorf("the client's tunnel is still open")
	}
	waitFor(t, "the table to empty", func() bool { return len(s.Conns()) == 0 })
}

func TestOnDialAttempt(t *testing.T) {
	p := testPolicy(t)
	echo := startLineEcho(t)
	tests := []struct {
		name     string
		setup    func(n *fakeNetwork)
		want     []string // "access point op", op "ok" for success
		wantFail bool
	}{
		{name: "first access point connects", setup: func(*fakeNetwork) {}, want: []string{"a ok"}},
		{name: "failover", setup: func(n *fakeNetwork) { n.setDial("a", dialRefuse) }, want: []string{"a connect", "b ok"}},
		{name: "nothing usable", setup: func(n *fakeNetwork) {
			n.setUnusable("a", "down")
			n.setUnusable("b", "down")
		}, want: []string{" select"}, wantFail: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newFakeNetwork(t)
			tt.setup(n)
			var mu sync.Mutex
			var got []string
			s := newLifecycleServer(t, Config{Network: n, OnDialAttempt: func(a DialAttempt) {
				outcome := "ok"
				if a.Err != nil {
					outcome = a.Err.Op
				}
				if a.App != "web" || a.Destination != "internet" || a.Target != echo {
					t.Errorf("attempt %+v, want app web, destination internet, target %s", a, echo)
				}
				mu.Lock()
				got = append(got, a.AccessPoint+" "+outcome)
				mu.Unlock()
			}})
			tl := serveListener(t, s, p.Listeners[0])

			c := dialProxy(t, tl.addr)
			c.Write(greeting(methodNoAuth))
			readExactly(t, c, 2)
			c.Write(request(t, 1, echo))
			reply := readExactly(t, c, 2)
			if failed := reply[1] != replySucceeded; failed != tt.wantFail {
				t.Errorf("reply code %d, want failure %v", reply[1], tt.wantFail)
			}

			mu.Lock()
			defer mu.Unlock()
			if !slices.Equal(got, tt.want) {
				t.Errorf("attempts %q, want %q", got, tt.want)
			}
		})
	}
}

// TestUpdateDuringAccepts swaps the policy listener of a socket while
// clients connect, to show that no accepted connection is dropped by a
// front end that closed under it.
func TestUpdateDuringAccepts(t *testing.T) {
	p := testPolicy(t)
	s := newLifecycleServer(t, Config{})
	tl := serveListener(t, s, p.Listeners[3]) // http, app web

	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialTimeout("tcp", tl.addr, 5*time.Second)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			// An origin-form request gets iapd's 400, from whichever
			// front end took the connection.
			io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil || !strings.HasPrefix(line, "HTTP/1.1 400") {
				errs <- errors.New("response " + line)
			}
		}()
	}
	for i := range 20 {
		l := p.Listeners[3]
		if i%2 == 0 {
			l = p.Listeners[2]
		}
		if err := s.Update(tl.ln, l); err != nil {
			t.Fatalf("Update: %v", err)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("client: %v", err)
	}
}
