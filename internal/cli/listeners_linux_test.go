package cli

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"iapd/policy"
	"iapd/proxy"
)

// reusePort returns the SO_REUSEPORT option of c.
func reusePort(t *testing.T, c syscall.Conn) int {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var value int
	var opErr error
	if err := raw.Control(func(fd uintptr) { value, opErr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT) }); err != nil {
		t.Fatal(err)
	}
	if opErr != nil {
		t.Fatal(opErr)
	}
	return value
}

// freePort returns a loopback port that is free for both UDP and TCP now.
func freePort(t *testing.T) int {
	t.Helper()
	for range 20 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := pc.LocalAddr().(*net.UDPAddr).Port
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		pc.Close()
		if err == nil {
			ln.Close()
			return port
		}
	}
	t.Fatal("no loopback port free for both udp and tcp")
	return 0
}

// TestListenerPlanSharesPort moves a port from a proxy listener to a DNS
// listener in one reload: the DNS listener's TCP socket opens while the
// proxy listener's is still open, and a rejected reload leaves the old
// socket as it was.
func TestListenerPlanSharesPort(t *testing.T) {
	port := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	oldLn, err := proxy.Listen(context.Background(), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer oldLn.Close()
	old := &openListener{l: &policy.Listener{Listen: addr}, ln: oldLn, key: listenKey(addr)}
	if ln, err := net.Listen("tcp", addr); !errors.Is(err, syscall.EADDRINUSE) {
		if ln != nil {
			ln.Close()
		}
		t.Fatalf("a plain second socket on %s: %v, want address already in use", addr, err)
	}

	p := &policy.Policy{Apps: map[string]*policy.App{"dev": {Name: "dev", DNSListen: addr}}}
	plan := planListeners([]*openListener{old}, nil, p, testLogger(t))
	if err := plan.open(); err != nil {
		t.Fatalf("open: %v", err)
	}
	od := plan.dnsAdded[0]
	if got := od.ln.Addr().String(); got != addr {
		t.Errorf("DNS listener's TCP socket on %s, want %s", got, addr)
	}
	if got := reusePort(t, oldLn.(*net.TCPListener)); got != 1 {
		t.Errorf("SO_REUSEPORT of the old socket = %d during the reload, want 1", got)
	}

	plan.abort()
	if od.pc != nil || od.ln != nil {
		t.Errorf("abort left the DNS listener's sockets open")
	}
	if got := reusePort(t, oldLn.(*net.TCPListener)); got != 0 {
		t.Errorf("SO_REUSEPORT of the old socket = %d after abort, want 0", got)
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("connecting to the old socket after abort: %v", err)
	}
	c.Close()
	if ln, err := net.Listen("tcp", addr); !errors.Is(err, syscall.EADDRINUSE) {
		if ln != nil {
			ln.Close()
		}
		t.Errorf("a plain second socket on %s after abort: %v, want address already in use", addr, err)
	}
}

// TestListenerPlanOpenBusyPort checks that a DNS listener that cannot
// open rejects the whole plan, with the app and address in the error, and
// closes what the plan opened before it.
func TestListenerPlanOpenBusyPort(t *testing.T) {
	tests := []struct {
		name    string
		network string // of the socket the test holds
	}{
		{name: "udp port taken", network: "udp"},
		{name: "tcp port taken", network: "tcp"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			port := freePort(t)
			addr := "127.0.0.1:" + strconv.Itoa(port)
			if tt.network == "udp" {
				held, err := net.ListenPacket("udp", addr)
				if err != nil {
					t.Fatal(err)
				}
				defer held.Close()
			} else {
				held, err := net.Listen("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				defer held.Close()
			}

			p := &policy.Policy{
				Listeners: []*policy.Listener{{Listen: "127.0.0.1:0"}},
				Apps:      map[string]*policy.App{"dev": {Name: "dev", DNSListen: addr}},
			}
			plan := planListeners(nil, nil, p, testLogger(t))
			err := plan.open()
			want := fmt.Sprintf("opening DNS listener %s of app dev: listen %s %s: bind: address already in use", addr, tt.network, addr)
			if err == nil || err.Error() != want {
				t.Fatalf("open: %v, want %s", err, want)
			}
			if plan.added[0].ln != nil {
				t.Errorf("the proxy listener opened before stays open")
			}
			// The UDP socket opens first, so it must be closed again.
			if tt.network == "tcp" {
				pc, err := net.ListenPacket("udp", addr)
				if err != nil {
					t.Fatalf("binding udp %s after the rejected open: %v", addr, err)
				}
				pc.Close()
			}
		})
	}
}

// opaqueListener hides the socket of a net.Listener, as a wrapper that
// offers no SyscallConn does.
type opaqueListener struct{ net.Listener }

// TestListenerPlanCannotShare checks the error of a plan whose new socket
// overlaps an old one that cannot be given SO_REUSEPORT. The error names
// the way around it.
func TestListenerPlanCannotShare(t *testing.T) {
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	ln, err := proxy.Listen(context.Background(), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	old := &openListener{l: &policy.Listener{Listen: addr}, ln: opaqueListener{ln}, key: listenKey(addr)}

	p := &policy.Policy{Apps: map[string]*policy.App{"dev": {Name: "dev", DNSListen: addr}}}
	plan := planListeners([]*openListener{old}, nil, p, testLogger(t))
	err = plan.open()
	want := fmt.Sprintf("opening DNS listener %s of app dev: %s overlaps %s, which this reload closes, and cannot share its port with it: "+
		"the socket has no file descriptor; reload once without the listener and once with it, or restart iapd", addr, addr, addr)
	if err == nil || err.Error() != want {
		t.Fatalf("open: %v, want %s", err, want)
	}
	if od := plan.dnsAdded[0]; od.pc != nil || od.ln != nil {
		t.Errorf("the rejected plan left the DNS listener's sockets open")
	}
}
