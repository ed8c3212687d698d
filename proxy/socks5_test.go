package proxy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"iapd/policy"
)

// SOCKS5 reply codes (RFC 1928 section 6) and method bytes (section 3).
const (
	replySucceeded           = 0x00
	replyNotAllowed          = 0x02
	replyNetworkUnreachable  = 0x03
	replyHostUnreachable     = 0x04
	replyConnectionRefused   = 0x05
	replyCommandNotSupported = 0x07
	replyAddressNotSupported = 0x08

	methodNoAuth       = 0x00
	methodUserPass     = 0x02
	methodNoAcceptable = 0xFF
)

// failureReply returns the exact reply go-socks5 sends for a failure: the
// code with an all-zero IPv4 bind address.
func failureReply(code byte) []byte { return []byte{5, code, 0, 1, 0, 0, 0, 0, 0, 0} }

// dialProxy connects to the proxy at addr with a deadline that keeps a
// broken test from hanging.
func dialProxy(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("connecting to proxy: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c.(*net.TCPConn)
}

// greeting returns the SOCKS5 method selection message offering methods.
func greeting(methods ...byte) []byte {
	return append([]byte{5, byte(len(methods))}, methods...)
}

// userPass returns the RFC 1929 user name and password request.
func userPass(user, password string) []byte {
	b := []byte{1, byte(len(user))}
	b = append(b, user...)
	b = append(b, byte(len(password)))
	return append(b, password...)
}

// request returns a SOCKS5 request for cmd to target (host:port): an IPv4
// or IPv6 address when host is one, a domain name otherwise.
func request(t *testing.T, cmd byte, target string) []byte {
	t.Helper()
	host, portText, err := net.SplitHostPort(target)
	if err != nil {
		t.Fatalf("splitting %q: %v", target, err)
	}
	port, err := strconv.ParseUint(portText, 10, 16)
	if err != nil {
		t.Fatalf("parsing port of %q: %v", target, err)
	}

	b := []byte{5, cmd, 0}
	if addr, err := netip.ParseAddr(host); err == nil && addr.Is4() {
		b = append(append(b, 1), addr.AsSlice()...)
	} else if err == nil {
		b = append(append(b, 4), addr.AsSlice()...)
	} else {
		b = append(append(b, 3, byte(len(host))), host...)
	}
	return binary.BigEndian.AppendUint16(b, uint16(port))
}

func readExactly(t *testing.T, r io.Reader, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		t.Fatalf("reading %d bytes: %v (got % x)", n, err, b)
	}
	return b
}

// readSuccess reads a success reply and returns its bind address.
func readSuccess(t *testing.T, r io.Reader) netip.AddrPort {
	t.Helper()
	head := readExactly(t, r, 4)
	if !bytes.Equal(head[:3], []byte{5, replySucceeded, 0}) {
		t.Fatalf("reply starts % x, want 05 00 00", head)
	}
	var size int
	switch head[3] {
	case 1:
		size = 4
	case 4:
		size = 16
	default:
		t.Fatalf("reply address type %d, want 1 or 4", head[3])
	}
	rest := readExactly(t, r, size+2)
	addr, _ := netip.AddrFromSlice(rest[:size])
	return netip.AddrPortFrom(addr, binary.BigEndian.Uint16(rest[size:]))
}

// expectClosed checks that the proxy closes c without sending more bytes.
func expectClosed(t *testing.T, c net.Conn) {
	t.Helper()
	rest, err := io.ReadAll(c)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("reading after the reply: %v", err)
	}
	if len(rest) > 0 {
		t.Errorf("proxy sent % x after the reply, want nothing", rest)
	}
}

// exchange sends payload through a tunnel to an echo server, half-closes,
// and checks that the echo comes back whole.
func exchange(t *testing.T, c *net.TCPConn, payload []byte) {
	t.Helper()
	if _, err := c.Write(payload); err != nil {
		t.Fatalf("writing payload: %v", err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatalf("half-closing: %v", err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading echo: %v", err)
	}
	if want := append([]byte("echo:"), payload...); !bytes.Equal(got, want) {
		t.Fatalf("echo is %q, want %q", got, want)
	}
}

func TestSOCKS5Connect(t *testing.T) {
	echo4 := startEchoServer(t, "tcp4")
	echo6 := startEchoServer(t, "tcp6")
	_, port4, _ := net.SplitHostPort(echo4)
	_, port6, _ := net.SplitHostPort(echo6)

	tests := []struct {
		name      string
		target    string
		oneWrite  bool // greeting, request and payload in a single write
		wantBind  string
		wantDial  string
		wantQuery string // lookup through the access point; empty for none
	}{
		{name: "ipv4", target: echo4, wantBind: "127.0.0.1", wantDial: "a " + echo4},
		{name: "ipv6", target: echo6, wantBind: "::1", wantDial: "a " + echo6},
		{name: "domain ipv4", target: "web.test:" + port4, wantBind: "127.0.0.1", wantDial: "a " + echo4, wantQuery: "a web.test"},
		{name: "domain ipv6", target: "web6.test:" + port6, wantBind: "::1", wantDial: "a " + echo6, wantQuery: "a web6.test"},
		{name: "one write", target: "web.test:" + port4, oneWrite: true, wantBind: "127.0.0.1", wantDial: "a " + echo4, wantQuery: "a web.test"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			network := newFakeNetwork(t)
			p := testPolicy(t)
			_, addr := startServer(t, Config{Network: network}, p.Listeners[0])
			c := dialProxy(t, addr)
			payload := []byte("payload for " + tt.name)

			if tt.oneWrite {
				msg := slices.Concat(greeting(methodNoAuth), request(t, 1, tt.target), payload)
				if _, err := c.Write(msg); err != nil {
					t.Fatalf("writing: %v", err)
				}
				c.CloseWrite()
			} else {
				c.Write(greeting(methodNoAuth))
			}
			if got := readExactly(t, c, 2); !bytes.Equal(got, []byte{5, methodNoAuth}) {
				t.Fatalf("method selection % x, want 05 00", got)
			}
			if !tt.oneWrite {
				c.Write(request(t, 1, tt.target))
			}
			bind := readSuccess(t, c)
			if bind.Addr().String() != tt.wantBind || bind.Port() == 0 {
				t.Errorf("bind address %v, want %s with a port", bind, tt.wantBind)
			}

			if tt.oneWrite {
				got, err := io.ReadAll(c)
				if err != nil {
					t.Fatalf("reading echo: %v", err)
				}
				if want := "echo:" + string(payload); string(got) != want {
					t.Fatalf("echo is %q, want %q: bytes sent behind the request were lost", got, want)
				}
			} else {
				exchange(t, c, payload)
			}

			if got := network.dials(); !slices.Equal(got, []string{tt.wantDial}) {
				t.Errorf("dials %q, want [%q]", got, tt.wantDial)
			}
			var wantQueries []string
			if tt.wantQuery != "" {
				wantQueries = []string{tt.wantQuery}
			}
			if got := network.resolved(); !slices.Equal(got, wantQueries) {
				t.Errorf("lookups %q, want %q", got, wantQueries)
			}
		})
	}
}

func TestSOCKS5ReplyCodes(t *testing.T) {
	refused := closedPort(t)
	echo := startEchoServer(t, "tcp4")
	_, port, _ := net.SplitHostPort(echo)

	tests := []struct {
		name     string
		listener func(p *policy.Policy) *policy.Listener
		setup    func(n *fakeNetwork)
		request  []byte // nil: CONNECT to target
		target   string
		want     []byte
	}{
		{name: "connection refused", target: refused, want: failureReply(replyConnectionRefused)},
		{
			name:   "network unreachable",
			target: echo,
			setup: func(n *fakeNetwork) {
				n.setUnusable("a", "link down")
				n.setUnusable("b", "no IPv4 address")
			},
			want: failureReply(replyNetworkUnreachable),
		},
		{name: "name not found", target: "missing.test:" + port, want: failureReply(replyHostUnreachable)},
		{
			name:   "host unreachable",
			target: echo,
			setup: func(n *fakeNetwork) {
				n.setDial("a", dialFail)
				n.setDial("b", dialFail)
			},
			want: failureReply(replyHostUnreachable),
		},
		{
			name:   "refused through every access point",
			target: echo,
			setup: func(n *fakeNetwork) {
				n.setDial("a", dialRefuse)
				n.setDial("b", dialRefuse)
			},
			want: failureReply(replyConnectionRefused),
		},
		{
			name: "listener without app",
			listener: func(*policy.Policy) *policy.Listener {
				return &policy.Listener{Listen: "127.0.0.1:0", Protocol: policy.ProtocolSOCKS5}
			},
			target: echo,
			want:   failureReply(replyNotAllowed),
		},
		{name: "bind", request: []byte{5, 2, 0, 1, 127, 0, 0, 1, 0, 80}, want: failureReply(replyCommandNotSupported)},
		{name: "udp associate", request: []byte{5, 3, 0, 1, 0, 0, 0, 0, 0, 0}, want: failureReply(replyCommandNotSupported)},
		{name: "unknown address type", request: []byte{5, 1, 0, 9, 0, 0}, want: failureReply(replyAddressNotSupported)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			network := newFakeNetwork(t)
			if tt.setup != nil {
				tt.setup(network)
			}
			p := testPolicy(t)
			l := p.Listeners[0]
			if tt.listener != nil {
				l = tt.listener(p)
			}
			_, addr := startServer(t, Config{Network: network, DialTimeout: 2 * time.Second}, l)
			c := dialProxy(t, addr)

			req := tt.request
			if req == nil {
				req = request(t, 1, tt.target)
			}
			c.Write(slices.Concat(greeting(methodNoAuth), req))
			if got := readExactly(t, c, 2); !bytes.Equal(got, []byte{5, methodNoAuth}) {
				t.Fatalf("method selection % x, want 05 00", got)
			}
			if got := readExactly(t, c, len(tt.want)); !bytes.Equal(got, tt.want) {
				t.Errorf("reply % x, want % x", got, tt.want)
			}
			expectClosed(t, c)
		})
	}
}

func TestSOCKS5Authentication(t *testing.T) {
	echo := startEchoServer(t, "tcp4")

	tests := []struct {
		name       string
		listener   int    // index in testPolicy
		methods    []byte // offered by the client
		wantMethod byte
		user, pass string // sent when the server picks user/password
		wantStatus byte   // RFC 1929 status
		wantDial   string // empty: no dial may happen
	}{
		{name: "users both methods", listener: 1, methods: []byte{methodNoAuth, methodUserPass}, wantMethod: methodUserPass, user: "alice", pass: "alice-secret", wantStatus: 0, wantDial: "b " + echo},
		{name: "users second user", listener: 1, methods: []byte{methodUserPass}, wantMethod: methodUserPass, user: "bob", pass: "bob-secret", wantStatus: 0, wantDial: "a " + echo},
		{name: "users no auth only", listener: 1, methods: []byte{methodNoAuth}, wantMethod: methodNoAcceptable},
		{name: "users wrong password", listener: 1, methods: []byte{methodUserPass}, wantMethod: methodUserPass, user: "alice", pass: "bob-secret", wantStatus: 1},
		{name: "users unknown user", listener: 1, methods: []byte{methodUserPass}, wantMethod: methodUserPass, user: "mallory", pass: "alice-secret", wantStatus: 1},
		{name: "app no auth", listener: 0, methods: []byte{methodNoAuth}, wantMethod: methodNoAuth, wantDial: "a " + echo},
		{name: "other app by port", listener: 5, methods: []byte{methodNoAuth}, wantMethod: methodNoAuth, wantDial: "b " + echo},
		{name: "app credentials ignored", listener: 0, methods: []byte{methodUserPass}, wantMethod: methodUserPass, user: "anyone", pass: "anything", wantStatus: 0, wantDial: "a " + echo},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			network := newFakeNetwork(t)
			p := testPolicy(t)
			_, addr := startServer(t, Config{Network: network}, p.Listeners[tt.listener])
			c := dialProxy(t, addr)

			c.Write(greeting(tt.methods...))
			if got, want := readExactly(t, c, 2), []byte{5, tt.wantMethod}; !bytes.Equal(got, want) {
				t.Fatalf("method selection % x, want % x", got, want)
			}
			if tt.wantMethod == methodNoAcceptable {
				expectClosed(t, c)
			} else {
				if tt.wantMethod == methodUserPass {
					c.Write(userPass(tt.user, tt.pass))
					if got, want := readExactly(t, c, 2), []byte{1, tt.wantStatus}; !bytes.Equal(got, want) {
						t.Fatalf("authentication status % x, want % x", got, want)
					}
				}
				if tt.wantDial == "" {
					expectClosed(t, c)
				} else {
					c.Write(request(t, 1, echo))
					readSuccess(t, c)
					exchange(t, c, []byte("hello"))
				}
			}

			var wantDials []string
			if tt.wantDial != "" {
				wantDials = []string{tt.wantDial}
			}
			if got := network.dials(); !slices.Equal(got, wantDials) {
				t.Errorf("dials %q, want %q", got, wantDials)
			}
		})
	}
}

func TestSOCKS5Curl(t *testing.T) {
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("curl is not installed")
	}
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello from "+r.Host)
	}))
	defer web.Close()
	_, port, _ := net.SplitHostPort(web.Listener.Addr().String())

	web6 := httptest.NewUnstartedServer(web.Config.Handler)
	ln6, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Fatalf("listening on ::1: %v", err)
	}
	web6.Listener.Close()
	web6.Listener = ln6
	web6.Start()
	defer web6.Close()
	_, port6, _ := net.SplitHostPort(ln6.Addr().String())

	tests := []struct {
		name     string
		listener int
		args     []string
		url      string
		want     string
		wantDial string
	}{
		{name: "socks5-hostname", args: []string{"--socks5-hostname"}, url: "http://web.test:" + port + "/", want: "hello from web.test:" + port, wantDial: "a 127.0.0.1:" + port},
		{name: "socks5 address", args: []string{"--socks5"}, url: "http://127.0.0.1:" + port + "/", want: "hello from 127.0.0.1:" + port, wantDial: "a 127.0.0.1:" + port},
		{name: "socks5 ipv6 address", args: []string{"--socks5"}, url: "http://[::1]:" + port6 + "/", want: "hello from [::1]:" + port6, wantDial: "a [::1]:" + port6},
		{name: "socks5-hostname ipv6", args: []string{"--socks5-hostname"}, url: "http://web6.test:" + port6 + "/", want: "hello from web6.test:" + port6, wantDial: "a [::1]:" + port6},
		{name: "socks5-hostname user", listener: 1, args: []string{"--proxy-user", "alice:alice-secret", "--socks5-hostname"}, url: "http://web.test:" + port + "/", want: "hello from web.test:" + port, wantDial: "b 127.0.0.1:" + port},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			network := newFakeNetwork(t)
			p := testPolicy(t)
			_, addr := startServer(t, Config{Network: network}, p.Listeners[tt.listener])

			args := slices.Concat([]string{"--silent", "--show-error", "--max-time", "10", "--noproxy", ""}, tt.args, []string{addr, tt.url})
			cmd := exec.Command(curl, args...)
			cmd.Env = []string{"PATH=/usr/bin:/bin"} // no proxy variables from the environment
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("curl %s: %v\n%s", strings.Join(args, " "), err, out)
			}
			if string(out) != tt.want {
				t.Errorf("curl output %q, want %q", out, tt.want)
			}
			if got := network.dials(); !slices.Equal(got, []string{tt.wantDial}) {
				t.Errorf("dials %q, want [%q]", got, tt.wantDial)
			}
		})
	}
}

func TestSOCKS5Failover(t *testing.T) {
	echo := startEchoServer(t, "tcp4")

	tests := []struct {
		name    string
		dialA   dialBehaviour
		maxTime time.Duration
	}{
		{name: "a refuses", dialA: dialRefuse, maxTime: time.Second},
		{name: "a hangs", dialA: dialHang, maxTime: 1900 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			network := newFakeNetwork(t)
			network.setDial("a", tt.dialA)
			p := testPolicy(t)
			var mu sync.Mutex
			var closed []ConnInfo
			cfg := Config{
				Network:     network,
				DialTimeout: 2 * time.Second, // a gets its half, then b the rest
				OnClose: func(ci ConnInfo) {
					mu.Lock()
					closed = append(closed, ci)
					mu.Unlock()
				},
			}
			_, addr := startServer(t, cfg, p.Listeners[0])
			c := dialProxy(t, addr)

			start := time.Now()
			c.Write(slices.Concat(greeting(methodNoAuth), request(t, 1, echo)))
			readExactly(t, c, 2)
			readSuccess(t, c)
			if took := time.Since(start); took > tt.maxTime {
				t.Errorf("connecting took %v, want under %v", took, tt.maxTime)
			}
			exchange(t, c, []byte("over b"))

			if got, want := network.dials(), []string{"a " + echo, "b " + echo}; !slices.Equal(got, want) {
				t.Errorf("dials %q, want %q", got, want)
			}
			waitFor(t, "connection to leave the table", func() bool {
				mu.Lock()
				defer mu.Unlock()
				return len(closed) == 1
			})
			if closed[0].AccessPoint != "b" || closed[0].Interface != "eth-b" {
				t.Errorf("connection went through %s (%s), want b (eth-b)", closed[0].AccessPoint, closed[0].Interface)
			}
		})
	}
}

// waitFor polls cond until it holds, failing the test after 5 seconds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestSOCKS5UnknownNameStaysOnFirstAccessPoint(t *testing.T) {
	network := newFakeNetwork(t)
	p := testPolicy(t)
	_, addr := startServer(t, Config{Network: network}, p.Listeners[0])
	c := dialProxy(t, addr)

	c.Write(slices.Concat(greeting(methodNoAuth), request(t, 1, "missing.test:80")))
	readExactly(t, c, 2)
	if got, want := readExactly(t, c, 10), failureReply(replyHostUnreachable); !bytes.Equal(got, want) {
		t.Errorf("reply % x, want % x", got, want)
	}
	if got, want := network.resolved(), []string{"a missing.test"}; !slices.Equal(got, want) {
		t.Errorf("lookups = %q, want %q: the next access point's resolver must not see the name", got, want)
	}
}
