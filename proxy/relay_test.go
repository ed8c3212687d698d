package proxy

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// greetTarget is a target that, on each connection, writes one byte "x",
// reads one byte and then holds the connection until the test ends. It
// serves connections one after another from a single goroutine, so that
// the targets add no goroutine per tunnel.
type greetTarget struct {
	addr  string
	mu    sync.Mutex
	conns []net.Conn // guarded by mu
	read  []byte     // the byte read from each connection, in order; guarded by mu
}

func startGreetTarget(t *testing.T) *greetTarget {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening: %v", err)
	}
	g := &greetTarget{addr: ln.Addr().String()}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			c.Write([]byte("x"))
			var b [1]byte
			io.ReadFull(c, b[:])
			g.mu.Lock()
			g.conns = append(g.conns, c)
			g.read = append(g.read, b[0])
			g.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		g.mu.Lock()
		for _, c := range g.conns {
			c.Close()
		}
		g.mu.Unlock()
	})
	return g
}

func (g *greetTarget) bytesRead() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return string(g.read)
}

// openIdleTunnel opens a tunnel to target through the listener at addr,
// speaking SOCKS5 or HTTP CONNECT, sends "y" and reads the target's "x",
// so that both directions have carried a byte.
func openIdleTunnel(t *testing.T, addr, target string, httpConnect bool) *net.TCPConn {
	t.Helper()
	c := dialProxy(t, addr)
	var r io.Reader = c
	if httpConnect {
		fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
		if err != nil {
			t.Fatalf("reading CONNECT response: %v", err)
		}
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("CONNECT status %d, want 200", resp.StatusCode)
		}
		r = br
	} else {
		c.Write(append(greeting(methodNoAuth), request(t, 1, target)...))
		readExactly(t, c, 2)
		readSuccess(t, c)
	}
	if _, err := c.Write([]byte("y")); err != nil {
		t.Fatalf("writing into tunnel: %v", err)
	}
	if got := readExactly(t, r, 1); string(got) != "x" {
		t.Fatalf("tunnel delivered %q, want x", got)
	}
	return c
}

// pipesInUse returns how many of the relay's pipes are held by tunnels.
func pipesInUse() int64 {
	pipes.mu.Lock()
	defer pipes.mu.Unlock()
	return pipes.open.Load() - int64(len(pipes.free))
}

// connectionGoroutines counts the goroutines of the relay, and those of
// the front ends' per-connection work: iapd's accept goroutines and the
// libraries' handshakes and relays.
func connectionGoroutines() (relays, others int) {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range strings.Split(string(buf), "\n\n") {
		switch {
		case strings.Contains(g, "created by iapd/proxy.(*Server).startRelayNotify"):
			relays++
		case strings.Contains(g, "created by iapd/proxy.(*Server).Serve "),
			strings.Contains(g, "github.com/armon/go-socks5."),
			strings.Contains(g, "github.com/elazarl/goproxy."),
			strings.Contains(g, "net/http.(*conn).serve"):
			others++
		}
	}
	return relays, others
}

// TestIdleTunnelCost checks what an idle tunnel keeps: the relay's two
// goroutines and no pipe. The front ends' libraries must have returned,
// with their goroutines and buffers. Not parallel: it counts the
// process's goroutines and the shared pipes.
func TestIdleTunnelCost(t *testing.T) {
	const tunnels = 10
	tests := []struct {
		name        string
		listener    int
		httpConnect bool
	}{
		{name: "socks5 listener", listener: 0},
		{name: "http listener", listener: httpListenerApp, httpConnect: true},
		{name: "mixed listener with socks5", listener: 2},
		{name: "mixed listener with http", listener: 2, httpConnect: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			target := startGreetTarget(t)
			s, addr := startServer(t, Config{Network: newFakeNetwork(t)}, testPolicy(t).Listeners[tt.listener])

			for range tunnels {
				openIdleTunnel(t, addr, target.addr, tt.httpConnect)
			}
			waitFor(t, "a y at the target from every tunnel", func() bool { return target.bytesRead() == strings.Repeat("y", tunnels) })
			if n := len(s.Conns()); n != tunnels {
				t.Errorf("table has %d rows, want %d", n, tunnels)
			}

			// The libraries' goroutines end shortly after the hand-off.
			var relays, others int
			deadline := time.Now().Add(5 * time.Second)
			for {
				relays, others = connectionGoroutines()
				if relays == 2*tunnels && others == 0 || time.Now().After(deadline) {
					break
				}
				time.Sleep(5 * time.Millisecond)
			}
			if relays != 2*tunnels || others != 0 {
				buf := make([]byte, 1<<20)
				t.Errorf("with %d idle tunnels: %d relay goroutines and %d other connection goroutines, want %d and 0; stacks:\n%s",
					tunnels, relays, others, 2*tunnels, buf[:runtime.Stack(buf, true)])
			}
			if runtime.GOOS == "linux" {
				if n := pipesInUse(); n != 0 {
					t.Errorf("%d pipes held by idle tunnels, want 0", n)
				}
			}
		})
	}
}

// TestRelayPipeWhileBlocked checks that a direction whose destination
// cannot take more bytes keeps them in its pipe, delivers every byte in
// order once the client reads, and gives the pipe back when idle again.
func TestRelayPipeWhileBlocked(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the relay splices only on Linux")
	}
	target := startHoldServer(t)
	var rec closeRecorder
	_, addr := startServer(t, Config{Network: newFakeNetwork(t), OnClose: rec.record}, testPolicy(t).Listeners[0])

	c := openTunnel(t, addr, target.addr)
	tc := target.accept(t)
	payload := make([]byte, 16<<20)
	for i := range payload {
		payload[i] = byte(i * 7 / 5)
	}
	written := make(chan error, 1)
	go func() {
		_, err := tc.Write(payload)
		written <- err
	}()

	// The client reads nothing yet, so its receive buffer fills and the
	// relay holds the rest in a pipe.
	waitFor(t, "a pipe held for the blocked client", func() bool { return pipesInUse() > 0 })

	got := make([]byte, len(payload))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("reading through tunnel: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Errorf("tunnel delivered different bytes than the target wrote")
	}
	if err := <-written; err != nil {
		t.Fatalf("target writing: %v", err)
	}
	waitFor(t, "the pipe to be returned", func() bool { return pipesInUse() == 0 })

	tc.Close()
	if rest, err := io.ReadAll(c); err != nil || len(rest) > 0 {
		t.Errorf("after the target closed, client read %d bytes and %v; want EOF", len(rest), err)
	}
	c.Close()
	waitFor(t, "the tunnel to close", func() bool { return len(rec.closed()) == 1 })
	if row := rec.closed()[0]; row.BytesDown != int64(len(payload)) || row.BytesUp != 0 {
		t.Errorf("closed row counts %d up and %d down, want 0 and %d", row.BytesUp, row.BytesDown, len(payload))
	}
}
