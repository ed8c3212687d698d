package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"syscall"
	"testing"
	"time"

	"iapd/policy"
)

// These fuzz tests send arbitrary bytes to the front ends through real
// loopback listeners. The upstream is an HTTP server inside the test
// process, reached over a socket pair whatever the target, so that no
// input can make the proxy connect anywhere. Every answer must be valid in
// the listener's protocol, and the server must go on serving.

// pipeNetwork is a Network whose every access point resolves any name to
// 192.0.2.1 and dials every address to an in-process HTTP server that
// echoes request bodies.
type pipeNetwork struct {
	upstream *chanListener
	fake     *fakeNetwork // for the conditions: every access point usable
}

func newPipeNetwork(f *testing.F) *pipeNetwork {
	n := &pipeNetwork{upstream: newChanListener("upstream"), fake: newFakeNetwork(f)}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.Copy(w, io.LimitReader(r.Body, 1<<16))
		}),
		ReadHeaderTimeout: time.Second,
		ErrorLog:          slog.NewLogLogger(slog.DiscardHandler, slog.LevelError),
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(n.upstream)
	}()
	f.Cleanup(func() {
		srv.Close()
		<-done
	})
	return n
}

func (n *pipeNetwork) Conditions() policy.Conditions         { return fakeConditions{n.fake} }
func (n *pipeNetwork) ReportDial(*policy.AccessPoint, error) {}
func (n *pipeNetwork) Dialer(*policy.AccessPoint) Dialer     { return n }
func (n *pipeNetwork) Resolver(*policy.AccessPoint) Resolver { return pipeResolver{} }
func (n *pipeNetwork) Interface(ap *policy.AccessPoint) string {
	return ap.Interface
}

// DialContext connects to the in-process server over a Unix socket pair,
// which unlike net.Pipe passes half-closes on.
func (n *pipeNetwork) DialContext(ctx context.Context, _, address string) (net.Conn, error) {
	if _, err := netip.ParseAddrPort(address); err != nil {
		return nil, fmt.Errorf("pipe network: %q is not IP:port", address)
	}
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socketpair", err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		file := os.NewFile(uintptr(fd), "socketpair")
		conns[i], err = net.FileConn(file)
		file.Close()
		if err != nil {
			if i == 1 {
				conns[0].Close()
			}
			return nil, err
		}
	}
	if !n.upstream.push(conns[1]) {
		conns[0].Close()
		conns[1].Close()
		return nil, errors.New("pipe network: upstream closed")
	}
	return conns[0], nil
}

type pipeResolver struct{}

func (pipeResolver) LookupNetIP(context.Context, string) ([]netip.Addr, error) {
	return []netip.Addr{netip.MustParseAddr("192.0.2.1")}, nil
}

// fuzzServer serves the listeners of testPolicy at the given indexes on
// loopback with short limits, for the whole fuzz run.
func fuzzServer(f *testing.F, listeners ...int) (*Server, []string) {
	f.Helper()
	p := testPolicy(f)
	s := NewServer(Config{
		Network: newPipeNetwork(f),
		Logger:  slog.New(slog.DiscardHandler),
		// Fuzzing keeps both cores busy, and a shorter deadline would
		// close some good clients before their first byte is read.
		HandshakeTimeout: 2 * time.Second,
		DialTimeout:      time.Second,
		IdleTimeout:      time.Second,
		MaxHeaderBytes:   4096,
		AuthFailureDelay: 0,
	})
	var addrs []string
	served := make(chan error, len(listeners))
	for _, i := range listeners {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			f.Fatalf("listening: %v", err)
		}
		addrs = append(addrs, ln.Addr().String())
		go func() { served <- s.Serve(ln, p.Listeners[i]) }()
	}
	f.Cleanup(func() {
		s.Close()
		for range listeners {
			if err := <-served; err != nil {
				f.Errorf("Serve: %v", err)
			}
		}
	})
	return s, addrs
}

// sendRaw writes data to addr, half-closes and returns everything the
// proxy sends back before it closes, or what came within 3 seconds, with
// the error that ended the reading.
func sendRaw(t *testing.T, addr string, data []byte) ([]byte, error) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("connecting to the proxy: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	// The proxy may close before it has read everything; what it sent
	// until then is still checked.
	c.Write(data)
	c.(*net.TCPConn).CloseWrite()
	var out bytes.Buffer
	_, err = io.Copy(&out, c)
	return out.Bytes(), err
}

// output returns what sendRaw read, for checks that do not care how the
// reading ended.
func output(out []byte, _ error) []byte { return out }

// checkSOCKS5Reply fails t when out is not what a SOCKS5 front end may
// send: nothing, the SOCKS4 rejection, or a method selection, then the
// user name and password status when that method was chosen, then a
// request reply, and after a success anything the tunnel carries.
func checkSOCKS5Reply(t *testing.T, out []byte) {
	t.Helper()
	if len(out) == 0 || bytes.Equal(out, socks4Rejected) {
		return
	}
	fail := func(why string) { t.Fatalf("invalid SOCKS5 output % x: %s", out, why) }
	if len(out) < 2 || out[0] != 5 {
		fail("no method selection")
	}
	method, rest := out[1], out[2:]
	switch method {
	case methodNoAcceptable:
		if len(rest) > 0 {
			fail("bytes after refusing every method")
		}
		return
	case methodUserPass:
		if len(rest) == 0 {
			return
		}
		if len(rest) < 2 || rest[0] != 1 || rest[1] > 1 {
			fail("invalid user name and password status")
		}
		if rest[1] == 1 {
			if len(rest) > 2 {
				fail("bytes after a failed login")
			}
			return
		}
		rest = rest[2:]
	case methodNoAuth:
	default:
		fail("unknown method chosen")
	}
	if len(rest) == 0 {
		return
	}
	if len(rest) < 4 || rest[0] != 5 || rest[1] > replyAddressNotSupported || rest[2] != 0 {
		fail("invalid request reply")
	}
	size := map[byte]int{1: 4, 4: 16}[rest[3]]
	if size == 0 || len(rest) < 4+size+2 {
		fail("invalid reply address")
	}
	if rest[1] != replySucceeded && len(rest) > 4+size+2 {
		fail("bytes after a failure reply")
	}
}

// checkHTTPReply fails t when out is not a sequence of HTTP/1.1 responses,
// the last of which may be cut short, or a 200 to CONNECT and then tunnel
// bytes.
func checkHTTPReply(t *testing.T, out []byte) {
	t.Helper()
	if len(out) == 0 {
		return
	}
	if !bytes.HasPrefix(out, []byte("HTTP/1.1 ")) && !bytes.HasPrefix(out, []byte("HTTP/1.0 ")) {
		t.Fatalf("output %q does not start with an HTTP status line", out)
	}
	br := bufio.NewReader(bytes.NewReader(out))
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			// The proxy may cut a response short when the client is gone.
			return
		}
		if resp.StatusCode < 100 || resp.StatusCode > 599 {
			t.Fatalf("status %d in %q", resp.StatusCode, out)
		}
		if resp.StatusCode == http.StatusOK && resp.ContentLength < 0 && resp.Header.Get("Transfer-Encoding") == "" {
			// A CONNECT success: the rest is the tunnel's.
			return
		}
		io.Copy(io.Discard, resp.Body)
		if _, err := br.Peek(1); err != nil {
			return
		}
	}
}

// checkServing fails t when the SOCKS5 listener at addr does not open a
// tunnel for a well-formed request.
func checkServing(t *testing.T, s *Server, addr string) {
	t.Helper()
	good := slices.Concat([]byte{5, 1, 0}, domainRequest("web.test"), []byte("GET / HTTP/1.0\r\n\r\n"))
	out, err := sendRaw(t, addr, good)
	want := []byte{5, 0, 5, 0, 0, 1}
	if !bytes.HasPrefix(out, want) || !bytes.Contains(out, []byte("HTTP/1.0 200 OK")) {
		s.mu.Lock()
		clients := len(s.clients)
		s.mu.Unlock()
		again, againErr := sendRaw(t, addr, good)
		t.Fatalf("server no longer serves: a good client read %q (%v); %d clients open, %d upstream connections, %+v; a second one read %q (%v)",
			out, err, clients, len(s.Conns()), s.Stats(), again, againErr)
	}
}

func addSeeds(f *testing.F, seeds ...[]byte) {
	for _, s := range seeds {
		f.Add(s)
	}
}

// socks5Seeds are SOCKS5 sessions for the seed corpus.
func socks5Seeds() [][]byte {
	connect := func(addr []byte) []byte {
		return binary.BigEndian.AppendUint16(append([]byte{5, 1, 0}, addr...), 80)
	}
	return [][]byte{
		slices.Concat([]byte{5, 1, 0}, connect([]byte{1, 192, 0, 2, 1}), []byte("GET / HTTP/1.0\r\n\r\n")),
		slices.Concat([]byte{5, 1, 0}, domainRequest("web.test")),
		slices.Concat([]byte{5, 1, 2, 1, 3}, []byte("bob"), []byte{10}, []byte("bob-secret"), connect(append([]byte{3, 8}, "web.test"...))),
		slices.Concat([]byte{5, 2, 0, 2}, connect(append([]byte{4}, netip.MustParseAddr("2001:db8::1").AsSlice()...))),
		{5, 1, 0, 5, 2, 0, 1, 0, 0, 0, 0, 0, 0},
		{5, 1, 0, 5, 1, 0, 9},
		{4, 1, 0, 80, 127, 0, 0, 1, 0},
		{5, 0},
	}
}

// httpSeeds are HTTP requests for the seed corpus.
func httpSeeds() [][]byte {
	return [][]byte{
		[]byte("GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\n\r\n"),
		[]byte("CONNECT web.test:443 HTTP/1.1\r\nHost: web.test:443\r\n\r\nhello"),
		[]byte("POST http://web.test/p HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
		[]byte("POST http://web.test/p HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc"),
		[]byte("GET http://web.test/ HTTP/1.1\r\nProxy-Authorization: basic Ym9iOmJvYi1zZWNyZXQ=\r\n\r\nGET http://web.test/2 HTTP/1.1\r\n\r\n"),
		[]byte("HEAD http://[2001:db8::1]:8080/ HTTP/1.0\r\n\r\n"),
		[]byte("GET / HTTP/1.1\r\nHost: web.test\r\n\r\n"),
	}
}

// FuzzSOCKS5Listener fuzzes the SOCKS5 front end, on a listener of one app
// and on one with users.
func FuzzSOCKS5Listener(f *testing.F) {
	s, addrs := fuzzServer(f, 0, 1)
	addSeeds(f, socks5Seeds()...)
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, addr := range addrs {
			checkSOCKS5Reply(t, output(sendRaw(t, addr, data)))
		}
		checkServing(t, s, addrs[0])
	})
}

// FuzzHTTPListener fuzzes the HTTP front end, on a listener of one app and
// on one with users.
func FuzzHTTPListener(f *testing.F) {
	s, addrs := fuzzServer(f, httpListenerApp, httpListenerUsers, 0)
	addSeeds(f, httpSeeds()...)
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, addr := range addrs[:2] {
			checkHTTPReply(t, output(sendRaw(t, addr, data)))
		}
		checkServing(t, s, addrs[2])
	})
}

// FuzzMixedListener fuzzes the mixed listener's sniffing of the protocol
// and both front ends behind it.
func FuzzMixedListener(f *testing.F) {
	s, addrs := fuzzServer(f, httpListenerMixed)
	addSeeds(f, socks5Seeds()...)
	addSeeds(f, httpSeeds()...)
	addSeeds(f, []byte{0x16, 3, 1, 0, 5}, []byte{0}, []byte("\r\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		out := output(sendRaw(t, addrs[0], data))
		switch {
		case len(data) == 0:
			if len(out) > 0 {
				t.Fatalf("output %q to no input", out)
			}
		case data[0] == 4 || data[0] == 5:
			checkSOCKS5Reply(t, out)
		case 'A' <= data[0] && data[0] <= 'Z', 'a' <= data[0] && data[0] <= 'z':
			checkHTTPReply(t, out)
		default:
			if len(out) > 0 {
				t.Fatalf("output %q to input of unknown protocol % x", out, data)
			}
		}
		checkServing(t, s, addrs[0])
	})
}
