package proxy

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"iapd/policy"
)

// These tests send malformed and unusual client input, each with the
// answer it must get, to a server that meanwhile carries an open tunnel of
// another client. That tunnel must still work at the end: one bad client
// never disturbs the others.

// keepTunnel opens a tunnel through the SOCKS5 listener at addr to an echo
// server and checks at the end of the test that it still carries bytes.
func keepTunnel(t *testing.T, addr, echo string) {
	t.Helper()
	c := openTunnel(t, addr, echo)
	t.Cleanup(func() {
		if t.Failed() {
			return
		}
		exchange(t, c, []byte("the other client is still served"))
	})
}

// socks4Request returns a SOCKS4 CONNECT to 127.0.0.1:port, or a SOCKS4a
// one to host when host is not empty.
func socks4Request(port uint16, host string) []byte {
	b := binary.BigEndian.AppendUint16([]byte{4, 1}, port)
	if host == "" {
		return append(append(b, 127, 0, 0, 1), "user\x00"...)
	}
	return append(append(b, 0, 0, 0, 1), "user\x00"+host+"\x00"...)
}

// domainRequest returns a SOCKS5 CONNECT to a domain name of any length up
// to 255, port 80.
func domainRequest(name string) []byte {
	b := append([]byte{5, 1, 0, 3, byte(len(name))}, name...)
	return binary.BigEndian.AppendUint16(b, 80)
}

func TestMalformedSOCKS5(t *testing.T) {
	echo := startEchoServer(t, "tcp4")
	_, portText, _ := net.SplitHostPort(echo)
	port, _ := strconv.ParseUint(portText, 10, 16)
	noAuth := []byte{5, methodNoAuth}

	tests := []struct {
		name      string
		listeners []int // indexes in testPolicy
		send      []byte
		stall     bool   // keep the connection open after sending, instead of half-closing
		want      []byte // everything the client reads until the proxy closes
	}{
		{name: "version byte alone", listeners: []int{0, 2}, send: []byte{5}},
		{name: "greeting cut short", listeners: []int{0, 2}, send: []byte{5, 2, 0}},
		{name: "greeting stalled", listeners: []int{0, 2}, send: []byte{5, 2, 0}, stall: true},
		{name: "no methods", listeners: []int{0, 2}, send: []byte{5, 0}, want: []byte{5, methodNoAcceptable}},
		{name: "unknown methods only", listeners: []int{0, 2}, send: []byte{5, 2, 0x80, 0xfe}, want: []byte{5, methodNoAcceptable}},
		{name: "version 6", listeners: []int{0, 2}, send: []byte{6, 1, 0}},
		{name: "socks4 connect", listeners: []int{0, 2}, send: socks4Request(uint16(port), ""), want: socks4Rejected},
		{name: "socks4a connect", listeners: []int{0, 2}, send: socks4Request(uint16(port), "web.test"), want: socks4Rejected},
		{name: "request with version 4", listeners: []int{0, 2}, send: slices.Concat(greeting(methodNoAuth), socks4Request(uint16(port), "")), want: noAuth},
		{name: "request cut short", listeners: []int{0, 2}, send: slices.Concat(greeting(methodNoAuth), []byte{5, 1, 0, 1, 127, 0}), want: noAuth},
		{name: "request stalled", listeners: []int{0, 2}, send: slices.Concat(greeting(methodNoAuth), []byte{5, 1, 0, 1, 127, 0}), stall: true, want: noAuth},
		{name: "zero-length name", listeners: []int{0, 2}, send: slices.Concat(greeting(methodNoAuth), domainRequest("")), want: slices.Concat(noAuth, failureReply(replyHostUnreachable))},
		{name: "name of 255 bytes", listeners: []int{0, 2}, send: slices.Concat(greeting(methodNoAuth), domainRequest(strings.Repeat("a", 251)+".test")), want: slices.Concat(noAuth, failureReply(replyHostUnreachable))},
		{name: "name cut short", listeners: []int{0, 2}, send: slices.Concat(greeting(methodNoAuth), []byte{5, 1, 0, 3, 20}, []byte("web.test")), want: noAuth},
		{name: "port zero", listeners: []int{0, 2}, send: slices.Concat(greeting(methodNoAuth), []byte{5, 1, 0, 1, 127, 0, 0, 1, 0, 0}), want: slices.Concat(noAuth, failureReply(replyHostUnreachable))},
		{name: "unknown command", listeners: []int{0, 2}, send: slices.Concat(greeting(methodNoAuth), []byte{5, 9, 0, 1, 127, 0, 0, 1, 0, 80}), want: slices.Concat(noAuth, failureReply(replyCommandNotSupported))},
		{name: "unknown address type", listeners: []int{0, 2}, send: slices.Concat(greeting(methodNoAuth), []byte{5, 1, 0, 9, 127, 0, 0, 1, 0, 80}), want: slices.Concat(noAuth, failureReply(replyAddressNotSupported))},
		{name: "auth version 2", listeners: []int{1}, send: slices.Concat(greeting(methodUserPass), []byte{2, 5}, []byte("alice"), []byte{12}, []byte("alice-secret")), want: []byte{5, methodUserPass}},
		{name: "empty user and password", listeners: []int{1}, send: slices.Concat(greeting(methodUserPass), []byte{1, 0, 0}), want: []byte{5, methodUserPass, 1, 1}},
		{name: "auth cut short", listeners: []int{1}, send: slices.Concat(greeting(methodUserPass), []byte{1, 5}, []byte("ali")), want: []byte{5, methodUserPass}},
	}
	for _, tt := range tests {
		for _, listener := range tt.listeners {
			t.Run(tt.name+" listener "+strconv.Itoa(listener), func(t *testing.T) {
				network := newFakeNetwork(t)
				p := testPolicy(t)
				cfg := Config{Network: network, HandshakeTimeout: 300 * time.Millisecond}
				_, addrs := startServerListeners(t, cfg, []*policy.Listener{p.Listeners[listener], p.Listeners[0]})
				keepTunnel(t, addrs[1], echo)
				dialsBefore := len(network.dials())

				c := dialProxy(t, addrs[0])
				start := time.Now()
				c.Write(tt.send)
				if !tt.stall {
					c.CloseWrite()
				}
				got, err := io.ReadAll(c)
				// Closing with the client's bytes unread makes the kernel
				// reset the connection, which is fine where no reply is due.
				if err != nil && !(len(tt.want) == 0 && errors.Is(err, syscall.ECONNRESET)) {
					t.Errorf("reading: %v", err)
				}
				if !bytes.Equal(got, tt.want) {
					t.Errorf("client read % x, want % x", got, tt.want)
				}
				if took := time.Since(start); tt.stall && (took < 250*time.Millisecond || took > 3*time.Second) {
					t.Errorf("stalled client closed after %v, want about the 300ms handshake timeout", took)
				}
				if got := network.dials()[dialsBefore:]; len(got) != 0 {
					t.Errorf("dials %q, want none", got)
				}
			})
		}
	}
}

// TestMalformedSOCKS5RequestBehindGreeting checks a client that sends its
// greeting, request and first payload in one packet, without waiting for
// the method selection.
func TestMalformedSOCKS5RequestBehindGreeting(t *testing.T) {
	echo := startEchoServer(t, "tcp4")
	network := newFakeNetwork(t)
	p := testPolicy(t)
	_, addrs := startServerListeners(t, Config{Network: network}, []*policy.Listener{p.Listeners[2], p.Listeners[0]})
	keepTunnel(t, addrs[1], echo)

	c := dialProxy(t, addrs[0])
	c.Write(slices.Concat(greeting(methodNoAuth), request(t, 1, echo), []byte("early payload")))
	c.CloseWrite()
	if got := readExactly(t, c, 2); !bytes.Equal(got, []byte{5, methodNoAuth}) {
		t.Fatalf("method selection % x, want 05 00", got)
	}
	readSuccess(t, c)
	if got, _ := io.ReadAll(c); string(got) != "echo:early payload" {
		t.Errorf("echo %q, want echo:early payload", got)
	}
}

// httpCase is one malformed or unusual HTTP exchange: the raw bytes a
// client sends and what it must get back.
type httpCase struct {
	name       string
	listener   int    // index in testPolicy
	request    string // ORIGIN stands for the origin's host:port as web.test:PORT, ADDR for 127.0.0.1:PORT
	wantStatus int
	wantBody   string // exact, or with wantPrefix a prefix
	wantPrefix bool
	// wantSeen is what the origin must have recorded: path, body and
	// headers; nil when the request must not reach it.
	wantSeen *httpRequestSeen
}

func TestMalformedHTTP(t *testing.T) {
	chunked := "5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
	long := strings.Repeat("n", 300)
	tests := []httpCase{
		{
			name:       "conflicting content-length",
			request:    "POST http://ORIGIN/post HTTP/1.1\r\nHost: ORIGIN\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
			wantStatus: http.StatusBadRequest,
			wantBody:   "400 Bad Request",
		},
		{
			name:       "chunked upload",
			request:    "POST http://ORIGIN/upload HTTP/1.1\r\nHost: ORIGIN\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
			wantStatus: http.StatusOK,
			wantBody:   "origin saw /upload",
			wantSeen:   &httpRequestSeen{path: "/upload", body: "hello, world"},
		},
		{
			// Transfer-Encoding wins over Content-Length, and the length
			// is dropped before forwarding (RFC 9112 section 6.3), so that
			// the two cannot be read differently downstream.
			name:       "chunked with content-length",
			request:    "POST http://ORIGIN/smuggle HTTP/1.1\r\nHost: ORIGIN\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
			wantStatus: http.StatusOK,
			wantBody:   "origin saw /smuggle",
			wantSeen:   &httpRequestSeen{path: "/smuggle", body: "hello, world"},
		},
		{
			name:       "unknown transfer coding",
			request:    "POST http://ORIGIN/gzip HTTP/1.1\r\nHost: ORIGIN\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + chunked,
			wantStatus: http.StatusNotImplemented,
			wantBody:   "Unsupported transfer encoding",
		},
		{
			name:       "response without length",
			request:    "GET http://ORIGIN/nolength HTTP/1.1\r\nHost: ORIGIN\r\n\r\n",
			wantStatus: http.StatusOK,
			wantBody:   strings.Repeat("no length ", 1000),
			wantSeen:   &httpRequestSeen{path: "/nolength"},
		},
		{
			// The request line's host is the target; Host is replaced
			// with it (RFC 9112 section 3.2.2).
			name:       "host header differs",
			request:    "GET http://ORIGIN/which HTTP/1.1\r\nHost: other.test\r\n\r\n",
			wantStatus: http.StatusOK,
			wantBody:   "origin saw /which",
			wantSeen:   &httpRequestSeen{path: "/which", host: "ORIGIN"},
		},
		{
			name:       "http/1.0 request",
			request:    "GET http://ORIGIN/old HTTP/1.0\r\n\r\n",
			wantStatus: http.StatusOK,
			wantBody:   "origin saw /old",
			wantSeen:   &httpRequestSeen{path: "/old"},
		},
		{
			// Without brackets the port cannot be told from the address;
			// http.Server refuses the request line.
			name:       "bare ipv6 address in connect",
			request:    "CONNECT ::1:443 HTTP/1.1\r\nHost: ::1:443\r\n\r\n",
			wantStatus: http.StatusBadRequest,
			wantBody:   "400 Bad Request",
			wantPrefix: true,
		},
		{
			name:       "overlong name in connect",
			request:    "CONNECT " + long + ".test:80 HTTP/1.1\r\nHost: " + long + ".test:80\r\n\r\n",
			wantStatus: http.StatusBadRequest,
			wantBody:   "iapd: destination \"internet\": resolving " + long + ".test:80",
			wantPrefix: true,
		},
		{
			name:       "lowercase basic",
			listener:   httpListenerUsers,
			request:    "GET http://ORIGIN/lower HTTP/1.1\r\nHost: ORIGIN\r\nProxy-Authorization: " + basicCredentials("basic", "bob", "bob-secret") + "\r\n\r\n",
			wantStatus: http.StatusOK,
			wantBody:   "origin saw /lower",
			wantSeen:   &httpRequestSeen{path: "/lower", header: http.Header{"Proxy-Authorization": nil}},
		},
		{
			name:       "garbage request line",
			request:    "nonsense\r\n\r\n",
			wantStatus: http.StatusBadRequest,
			wantBody:   "400 Bad Request",
			wantPrefix: true,
		},
		{
			name:       "header without colon",
			request:    "GET http://ORIGIN/ HTTP/1.1\r\nHost: ORIGIN\r\nno colon here\r\n\r\n",
			wantStatus: http.StatusBadRequest,
			wantBody:   "400 Bad Request",
			wantPrefix: true,
		},
		{
			// RFC 9112 section 5.2 lets a proxy replace the folding with a
			// space instead of rejecting it.
			name:       "obsolete line folding",
			request:    "GET http://ORIGIN/folded HTTP/1.1\r\nHost: ORIGIN\r\nX-Folded: a\r\n b\r\n\r\n",
			wantStatus: http.StatusOK,
			wantBody:   "origin saw /folded",
			wantSeen:   &httpRequestSeen{path: "/folded", header: http.Header{"X-Folded": {"a b"}}},
		},
		{
			name:       "nul in header",
			request:    "GET http://ORIGIN/ HTTP/1.1\r\nHost: ORIGIN\r\nX-Nul: a\x00b\r\n\r\n",
			wantStatus: http.StatusBadRequest,
			wantBody:   "400 Bad Request",
			wantPrefix: true,
		},
		{
			name:       "http/1.2 connect",
			request:    "CONNECT ORIGIN HTTP/1.2\r\nHost: ORIGIN\r\n\r\n",
			wantStatus: http.StatusOK,
		},
		{
			name:       "http/2 preface",
			request:    "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
			wantStatus: http.StatusBadRequest,
			wantBody:   "iapd is a proxy: send requests in absolute form (GET http://host/path) or use CONNECT host:port\n",
		},
	}
	for _, tt := range tests {
		listeners := []int{httpListenerApp, httpListenerMixed}
		if tt.listener != 0 {
			listeners = []int{tt.listener}
		}
		for _, listener := range listeners {
			t.Run(tt.name+" listener "+strconv.Itoa(listener), func(t *testing.T) {
				bed := newMalformedHTTPBed(t, listener)
				target := bed.originTarget()
				request := strings.ReplaceAll(tt.request, "ORIGIN", target)

				resp, body, _, _ := rawExchange(t, bed.proxy, request)
				if resp.StatusCode != tt.wantStatus {
					t.Errorf("status %d, want %d", resp.StatusCode, tt.wantStatus)
				}
				if resp.ProtoMajor != 1 || resp.ProtoMinor > 1 {
					t.Errorf("response version %s, want HTTP/1.0 or HTTP/1.1", resp.Proto)
				}
				if tt.wantPrefix && !strings.HasPrefix(body, tt.wantBody) || !tt.wantPrefix && body != tt.wantBody {
					t.Errorf("body %q, want %q", body, tt.wantBody)
				}

				seen := bed.origin.requests()
				if tt.wantSeen == nil {
					if len(seen) != 0 {
						t.Errorf("origin saw %+v, want nothing", seen)
					}
					return
				}
				if len(seen) != 1 {
					t.Fatalf("origin saw %d requests, want 1", len(seen))
				}
				if want := strings.ReplaceAll(tt.wantSeen.host, "ORIGIN", target); want != "" && seen[0].host != want {
					t.Errorf("origin saw Host %q, want %q", seen[0].host, want)
				}
				if seen[0].path != tt.wantSeen.path || seen[0].body != tt.wantSeen.body {
					t.Errorf("origin saw %s with body %q, want %s with %q", seen[0].path, seen[0].body, tt.wantSeen.path, tt.wantSeen.body)
				}
				if v := seen[0].header.Get("Content-Length"); v != "" && tt.wantSeen.body != "" && v != strconv.Itoa(len(tt.wantSeen.body)) {
					t.Errorf("origin saw Content-Length %s for a body of %d bytes", v, len(tt.wantSeen.body))
				}
				for name, values := range tt.wantSeen.header {
					want := strings.Join(values, ",")
					want = strings.ReplaceAll(want, "ORIGIN", target)
					if got := strings.Join(seen[0].header.Values(name), ","); got != want {
						t.Errorf("origin saw %s %q, want %q", name, got, want)
					}
				}
			})
		}
	}
}

// malformedHTTPBed is an HTTP test bed whose server also carries the open
// tunnel of another client.
type malformedHTTPBed struct{ *httpTestBed }

func newMalformedHTTPBed(t *testing.T, listener int) malformedHTTPBed {
	t.Helper()
	bed := newHTTPTestBed(t, listener, Config{})
	echo := startEchoServer(t, "tcp4")
	// The other client uses the same server through a CONNECT tunnel.
	resp, _, c, r := rawExchange(t, bed.proxy, "CONNECT "+echo+" HTTP/1.1\r\nHost: "+echo+"\r\n"+proxyAuthFor(listener)+"\r\n")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("other client's CONNECT: status %d", resp.StatusCode)
	}
	t.Cleanup(func() {
		if t.Failed() {
			return
		}
		c.Write([]byte("the other client is still served"))
		c.(*net.TCPConn).CloseWrite()
		if got, _ := io.ReadAll(r); string(got) != "echo:the other client is still served" {
			t.Errorf("other client's tunnel carried %q afterwards", got)
		}
	})
	return malformedHTTPBed{bed}
}

// proxyAuthFor returns the Proxy-Authorization line a request needs on the
// listener of testPolicy at index listener.
func proxyAuthFor(listener int) string {
	if listener == httpListenerUsers {
		return "Proxy-Authorization: " + basicCredentials("Basic", "bob", "bob-secret") + "\r\n"
	}
	return ""
}

func TestMalformedHTTPExpectContinue(t *testing.T) {
	bed := newMalformedHTTPBed(t, httpListenerApp)
	target := bed.originTarget()
	c := dialProxy(t, bed.proxy)
	br := bufio.NewReader(c)

	c.Write([]byte("POST http://" + target + "/continue HTTP/1.1\r\nHost: " + target + "\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n"))
	interim, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading the interim response: %v", err)
	}
	if interim.StatusCode != http.StatusContinue {
		t.Fatalf("interim status %d, want 100 before the body is sent", interim.StatusCode)
	}
	c.Write([]byte("the payload"))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || string(body) != "origin saw /continue" {
		t.Errorf("response %d %q, want 200 origin saw /continue", resp.StatusCode, body)
	}
	if seen := bed.origin.requests(); len(seen) != 1 || seen[0].body != "the payload" {
		t.Errorf("origin saw %+v, want one request with the payload", seen)
	}
}

func TestMalformedHTTPHead(t *testing.T) {
	bed := newMalformedHTTPBed(t, httpListenerApp)
	target := bed.originTarget()
	c := dialProxy(t, bed.proxy)
	br := bufio.NewReader(c)

	// A HEAD response has a length but no body; the next request on the
	// connection must be read as a request, not as that body.
	c.Write([]byte("HEAD http://" + target + "/head HTTP/1.1\r\nHost: " + target + "\r\n\r\n" +
		"GET http://" + target + "/after HTTP/1.1\r\nHost: " + target + "\r\n\r\n"))
	head, err := http.ReadResponse(br, &http.Request{Method: http.MethodHead})
	if err != nil {
		t.Fatalf("reading the HEAD response: %v", err)
	}
	if head.StatusCode != http.StatusOK || head.ContentLength != int64(len("origin saw /head")) {
		t.Errorf("HEAD response %d with length %d, want 200 with %d", head.StatusCode, head.ContentLength, len("origin saw /head"))
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading the response after HEAD: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || string(body) != "origin saw /after" {
		t.Errorf("response after HEAD %d %q, want 200 origin saw /after", resp.StatusCode, body)
	}
}

func TestMalformedHTTPBracketedIPv6Connect(t *testing.T) {
	echo6 := startEchoServer(t, "tcp6")
	_, addr := startServer(t, Config{Network: newFakeNetwork(t)}, testPolicy(t).Listeners[httpListenerApp])
	resp, _, c, r := rawExchange(t, addr, "CONNECT "+echo6+" HTTP/1.1\r\nHost: "+echo6+"\r\n\r\n")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT %s: status %d, want 200", echo6, resp.StatusCode)
	}
	c.Write([]byte("v6"))
	c.(*net.TCPConn).CloseWrite()
	if got, _ := io.ReadAll(r); string(got) != "echo:v6" {
		t.Errorf("echo %q, want echo:v6", got)
	}
}
