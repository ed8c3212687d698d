package proxy

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"
)

// openIdleTunnel opens a tunnel to target through the listener at addr,
// speaking SOCKS5 or HTTP CONNECT, and passes one byte each way, so that
// both directions of the relay have run.
func openIdleTunnel(t *testing.T, addr string, target *holdServer, httpConnect bool) {
	t.Helper()
	var (
		c net.Conn
		r io.Reader
	)
	if httpConnect {
		resp, _, conn, br := rawExchange(t, addr, "CONNECT "+target.addr+" HTTP/1.1\r\nHost: "+target.addr+"\r\n\r\n")
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("CONNECT status %d, want 200", resp.StatusCode)
		}
		c, r = conn, br
	} else {
		tc := dialProxy(t, addr)
		tc.Write(append(greeting(methodNoAuth), request(t, 1, target.addr)...))
		readExactly(t, tc, 2)
		readSuccess(t, tc)
		c, r = tc, tc
	}
	tc := target.accept(t)

	if _, err := c.Write([]byte("y")); err != nil {
		t.Fatalf("writing into tunnel: %v", err)
	}
	if got := readExactly(t, tc, 1); string(got) != "y" {
		t.Fatalf("target read %q, want y", got)
	}
	if _, err := tc.Write([]byte("x")); err != nil {
		t.Fatalf("target writing: %v", err)
	}
	if got := readExactly(t, r, 1); string(got) != "x" {
		t.Fatalf("client read %q, want x", got)
	}
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
			target := startHoldServer(t)
			s, addr := startServer(t, Config{Network: newFakeNetwork(t)}, testPolicy(t).Listeners[tt.listener])

			for range tunnels {
				openIdleTunnel(t, addr, target, tt.httpConnect)
			}
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
			// A direction gives its pipe back once it finds nothing more
			// to read, which may be just after the client has read.
			if runtime.GOOS == "linux" {
				waitFor(t, "idle tunnels to hold no pipe", func() bool { return pipesInUse() == 0 })
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
