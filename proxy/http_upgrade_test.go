package proxy

import (
	"bufio"
	"crypto/sha1"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// upgradeTestKey is the Sec-WebSocket-Key of the handshakes in the tests,
// the sample nonce of RFC 6455 section 1.3.
const upgradeTestKey = "dGhlIHNhbXBsZSBub25jZQ=="

// upgradeOrigin is a loopback origin server that speaks the handshake of
// any Upgrade protocol, with the WebSocket fields when the protocol is
// websocket. On /switch it responds to a request with Connection: upgrade
// with 101 and a server frame "hello" in the same write. Then it echoes
// every byte until the client's end of stream, or with the query ?close it
// closes after the frame. /refuse responds 400, and any other path "origin
// saw PATH", both keeping the connection for the next request.
type upgradeOrigin struct {
	addr     string
	sessions chan upgradeSession // one per connection, when it has closed

	mu   sync.Mutex
	seen []httpRequestSeen // guarded by mu
}

// upgradeSession is what one connection of the origin carried.
type upgradeSession struct {
	read, written int64
}

func startUpgradeOrigin(t *testing.T) *upgradeOrigin {
	t.Helper()
	o := &upgradeOrigin{sessions: make(chan upgradeSession, 16)}
	o.addr = startLoopbackServer(t, o.serve)
	return o
}

func (o *upgradeOrigin) serve(raw net.Conn) {
	c := &countingConn{Conn: raw}
	defer func() {
		raw.Close()
		o.sessions <- upgradeSession{read: c.read.Load(), written: c.written.Load()}
	}()
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	for {
		r, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		io.Copy(io.Discard, r.Body)
		o.mu.Lock()
		o.seen = append(o.seen, httpRequestSeen{path: r.URL.Path, host: r.Host, header: r.Header.Clone()})
		o.mu.Unlock()

		switch {
		case r.URL.Path == "/switch" && hasToken(r.Header, "Connection", "upgrade") && r.Header.Get("Upgrade") != "":
			o.switchProtocols(c, br, r)
			return
		case r.URL.Path == "/refuse":
			writeTextResponse(c, "400 Bad Request", "upgrade refused")
		default:
			writeTextResponse(c, "200 OK", "origin saw "+r.URL.Path)
		}
	}
}

// switchProtocols responds to r with 101 and then echoes what follows.
func (o *upgradeOrigin) switchProtocols(c *countingConn, br *bufio.Reader, r *http.Request) {
	var head strings.Builder
	head.WriteString("HTTP/1.1 101 Switching Protocols\r\n")
	fmt.Fprintf(&head, "Upgrade: %s\r\n", r.Header.Get("Upgrade"))
	head.WriteString("Connection: Upgrade, X-Origin-Hop\r\nX-Origin-Hop: 1\r\nKeep-Alive: timeout=5\r\n")
	if strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		fmt.Fprintf(&head, "Sec-WebSocket-Accept: %s\r\n", webSocketAccept(r.Header.Get("Sec-WebSocket-Key")))
	}
	head.WriteString("\r\n")
	c.Write(append([]byte(head.String()), serverFrame("hello")...))
	if r.URL.RawQuery == "close" {
		return
	}

	// br holds what the client sent right after its request.
	io.Copy(c, br)
	c.Conn.(*net.TCPConn).CloseWrite()
}

func (o *upgradeOrigin) requests() []httpRequestSeen {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.seen)
}

// session returns the counts of the next connection of the origin to close.
func (o *upgradeOrigin) session(t *testing.T) upgradeSession {
	t.Helper()
	select {
	case s := <-o.sessions:
		return s
	case <-time.After(5 * time.Second):
		t.Fatal("timed out waiting for the origin's connection to close")
		return upgradeSession{}
	}
}

func writeTextResponse(w io.Writer, status, body string) {
	fmt.Fprintf(w, "HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s", status, len(body), body)
}

// countingConn counts the bytes read from and written to a connection.
type countingConn struct {
	net.Conn
	read, written atomic.Int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.read.Add(int64(n))
	return n, err
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.written.Add(int64(n))
	return n, err
}

// webSocketAccept returns the Sec-WebSocket-Accept of key (RFC 6455
// section 4.2.2).
func webSocketAccept(key string) string {
	sum := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	return base64.StdEncoding.EncodeToString(sum[:])
}

// serverFrame returns an unmasked WebSocket text frame of a short payload.
func serverFrame(payload string) []byte {
	return append([]byte{0x81, byte(len(payload))}, payload...)
}

// clientFrame returns a masked WebSocket text frame of a short payload, as
// a client must send it (RFC 6455 section 5.3).
func clientFrame(payload string) []byte {
	mask := []byte{0x37, 0xfa, 0x21, 0x3d}
	frame := append([]byte{0x81, 0x80 | byte(len(payload))}, mask...)
	for i := range len(payload) {
		frame = append(frame, payload[i]^mask[i%4])
	}
	return frame
}

// upgradeRequest returns a request through the proxy for path on target
// that requests a switch to protocol, with the WebSocket fields for
// websocket, and extra header lines.
func upgradeRequest(target, path, protocol string, extra ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "GET http://%s%s HTTP/1.1\r\nHost: %s\r\n", target, path, target)
	fmt.Fprintf(&b, "Connection: Upgrade\r\nUpgrade: %s\r\n", protocol)
	if protocol == "websocket" {
		fmt.Fprintf(&b, "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n", upgradeTestKey)
	}
	for _, line := range extra {
		b.WriteString(line + "\r\n")
	}
	b.WriteString("\r\n")
	return b.String()
}

// readUpgradeResponse reads the proxy's response to an upgrade request
// from br, leaving what follows a 101 in br.
func readUpgradeResponse(t *testing.T, br *bufio.Reader) *http.Response {
	t.Helper()
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodGet})
	if err != nil {
		t.Fatalf("reading response: %v", err)
	}
	return resp
}

func readFull(t *testing.T, r io.Reader, n int) string {
	t.Helper()
	buf := make([]byte, n)
	if _, err := io.ReadFull(r, buf); err != nil {
		t.Fatalf("reading %d bytes: %v (got %q)", n, err, buf)
	}
	return string(buf)
}

func TestHTTPUpgrade(t *testing.T) {
	tests := []struct {
		name     string
		protocol string
	}{
		{name: "websocket", protocol: "websocket"},
		{name: "other protocol", protocol: "echo/1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var rec closeRecorder
			bed := newHTTPTestBed(t, httpListenerApp, Config{OnClose: rec.record})
			origin := startUpgradeOrigin(t)
			_, port, _ := net.SplitHostPort(origin.addr)
			target := net.JoinHostPort("web.test", port)
			kernelBefore := relayCopies.Kernel.Load()

			c, err := net.Dial("tcp", bed.proxy)
			if err != nil {
				t.Fatalf("dialling proxy: %v", err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			// The first frame travels in the same write as the request.
			early := clientFrame("early")
			if _, err := io.WriteString(c, upgradeRequest(target, "/switch", tt.protocol)+string(early)); err != nil {
				t.Fatalf("writing request: %v", err)
			}

			br := bufio.NewReader(c)
			resp := readUpgradeResponse(t, br)
			if resp.StatusCode != http.StatusSwitchingProtocols {
				t.Fatalf("status = %d, want 101", resp.StatusCode)
			}
			if got := resp.Header.Get("Upgrade"); got != tt.protocol {
				t.Errorf("Upgrade = %q, want %q", got, tt.protocol)
			}
			if got := resp.Header.Get("Connection"); got != "Upgrade" {
				t.Errorf("Connection = %q, want %q", got, "Upgrade")
			}
			for _, name := range []string{"X-Origin-Hop", "Keep-Alive"} {
				if v, ok := resp.Header[name]; ok {
					t.Errorf("client got response header %s: %q", name, v)
				}
			}
			if tt.protocol == "websocket" {
				if got, want := resp.Header.Get("Sec-WebSocket-Accept"), webSocketAccept(upgradeTestKey); got != want {
					t.Errorf("Sec-WebSocket-Accept = %q, want %q", got, want)
				}
			}

			// The origin's frame came in the same write as its 101.
			if got, want := readFull(t, br, len(serverFrame("hello"))), string(serverFrame("hello")); got != want {
				t.Errorf("first bytes after 101 = %q, want %q", got, want)
			}
			if got := readFull(t, br, len(early)); got != string(early) {
				t.Errorf("echo of early frame = %q, want %q", got, early)
			}
			ping := clientFrame("ping")
			if _, err := c.Write(ping); err != nil {
				t.Fatalf("writing frame: %v", err)
			}
			if got := readFull(t, br, len(ping)); got != string(ping) {
				t.Errorf("echo of frame = %q, want %q", got, ping)
			}

			rows := bed.s.Conns()
			if len(rows) != 1 {
				t.Fatalf("table has %d rows, want the upgraded connection", len(rows))
			}
			row := rows[0]
			want := ConnInfo{ID: row.ID, App: "web", Listener: bed.l.Listen, Target: target, Destination: "internet", AccessPoint: "a", Interface: "eth-a", Started: row.Started}
			if row.BytesUp, row.BytesDown = 0, 0; row != want {
				t.Errorf("table row = %+v, want %+v", row, want)
			}

			// The client's end of stream reaches the origin, which ends too.
			c.(*net.TCPConn).CloseWrite()
			if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
				t.Errorf("after half-close read %q, %v; want end of stream", rest, err)
			}
			session := origin.session(t)
			waitFor(t, "the upgraded connection to leave the table", func() bool { return len(rec.closed()) == 1 })
			closed := rec.closed()[0]
			if closed.BytesUp != session.read || closed.BytesDown != session.written {
				t.Errorf("counted %d bytes up, %d down; the origin read %d and wrote %d",
					closed.BytesUp, closed.BytesDown, session.read, session.written)
			}
			// iapd's relay moved the bytes, not goproxy's copies.
			if k := relayCopies.Kernel.Load() - kernelBefore; k != 2 {
				t.Errorf("kernel copies = %d, want 2", k)
			}

			seen := origin.requests()
			if len(seen) != 1 {
				t.Fatalf("origin saw %d requests, want 1", len(seen))
			}
			if got := seen[0].header.Get("Upgrade"); got != tt.protocol {
				t.Errorf("origin saw Upgrade %q, want %q", got, tt.protocol)
			}
			if got := seen[0].header.Get("Connection"); got != "Upgrade" {
				t.Errorf("origin saw Connection %q, want %q", got, "Upgrade")
			}
		})
	}
}

func TestHTTPUpgradeRefusedByOrigin(t *testing.T) {
	tests := []struct {
		name       string
		path       string
		wantStatus int
		wantBody   string
	}{
		{name: "bad request", path: "/refuse", wantStatus: http.StatusBadRequest, wantBody: "upgrade refused"},
		{name: "ordinary response", path: "/ignore", wantStatus: http.StatusOK, wantBody: "origin saw /ignore"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bed := newHTTPTestBed(t, httpListenerApp, Config{})
			origin := startUpgradeOrigin(t)
			_, port, _ := net.SplitHostPort(origin.addr)
			target := net.JoinHostPort("web.test", port)

			resp, body, c, br := rawExchange(t, bed.proxy, upgradeRequest(target, tt.path, "websocket"))
			if resp.StatusCode != tt.wantStatus || body != tt.wantBody {
				t.Errorf("response = %d %q, want %d %q", resp.StatusCode, body, tt.wantStatus, tt.wantBody)
			}
			if resp.Close {
				t.Errorf("response closes the client connection")
			}
			if v, ok := resp.Header["Upgrade"]; ok {
				t.Errorf("client got Upgrade %q with status %d", v, resp.StatusCode)
			}
			// The refused upgrade's own upstream connection closes.
			origin.session(t)

			// The client connection goes on as HTTP.
			fmt.Fprintf(c, "GET http://%s/after HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
			next, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("reading second response: %v", err)
			}
			nextBody, _ := io.ReadAll(next.Body)
			if next.StatusCode != http.StatusOK || string(nextBody) != "origin saw /after" {
				t.Errorf("second response = %d %q, want 200 %q", next.StatusCode, nextBody, "origin saw /after")
			}

			seen := origin.requests()
			if len(seen) != 2 {
				t.Fatalf("origin saw %d requests, want 2", len(seen))
			}
			if got := seen[0].header.Get("Upgrade"); got != "websocket" {
				t.Errorf("origin saw Upgrade %q on the upgrade request, want websocket", got)
			}
			if v, ok := seen[1].header["Upgrade"]; ok {
				t.Errorf("origin saw Upgrade %q on the next request", v)
			}
		})
	}
}

func TestHTTPUpgradeHeaders(t *testing.T) {
	tests := []struct {
		name           string
		request        func(target string) string
		wantStatus     int
		wantUpgrade    string // Upgrade the origin saw; "" for none
		wantConnection string // Connection the origin saw; "" for none or keep-alive
	}{
		{
			name: "upgrade without connection token",
			request: func(target string) string {
				return "GET http://" + target + "/switch HTTP/1.1\r\nHost: " + target + "\r\nUpgrade: websocket\r\n\r\n"
			},
			wantStatus: http.StatusOK,
		},
		{
			name: "connection upgrade without upgrade field",
			request: func(target string) string {
				return "GET http://" + target + "/switch HTTP/1.1\r\nHost: " + target + "\r\nConnection: Upgrade\r\n\r\n"
			},
			wantStatus: http.StatusOK,
		},
		{
			name: "http/1.0 request",
			request: func(target string) string {
				return "GET http://" + target + "/switch HTTP/1.0\r\nHost: " + target + "\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
			},
			wantStatus: http.StatusOK,
		},
		{
			name: "other hop-by-hop fields",
			request: func(target string) string {
				req := upgradeRequest(target, "/switch", "websocket",
					"X-Secret: 1", "Keep-Alive: timeout=5", "Te: trailers", "Proxy-Connection: keep-alive",
					"Proxy-Authorization: "+basicCredentials("Basic", "bob", "bob-secret"), "X-End: 1")
				return strings.Replace(req, "Connection: Upgrade", "Connection: keep-alive, Upgrade, X-Secret", 1)
			},
			wantStatus:     http.StatusSwitchingProtocols,
			wantUpgrade:    "websocket",
			wantConnection: "Upgrade",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bed := newHTTPTestBed(t, httpListenerApp, Config{})
			origin := startUpgradeOrigin(t)
			_, port, _ := net.SplitHostPort(origin.addr)
			target := net.JoinHostPort("web.test", port)

			c, err := net.Dial("tcp", bed.proxy)
			if err != nil {
				t.Fatalf("dialling proxy: %v", err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			io.WriteString(c, tt.request(target))
			resp := readUpgradeResponse(t, bufio.NewReader(c))
			if resp.StatusCode != tt.wantStatus {
				t.Errorf("status = %d, want %d", resp.StatusCode, tt.wantStatus)
			}

			seen := origin.requests()
			if len(seen) != 1 {
				t.Fatalf("origin saw %d requests, want 1", len(seen))
			}
			h := seen[0].header
			if got := h.Get("Upgrade"); got != tt.wantUpgrade {
				t.Errorf("origin saw Upgrade %q, want %q", got, tt.wantUpgrade)
			}
			if got := h.Get("Connection"); got != tt.wantConnection && !(tt.wantConnection == "" && strings.EqualFold(got, "keep-alive")) {
				t.Errorf("origin saw Connection %q, want %q", got, tt.wantConnection)
			}
			for _, name := range []string{"X-Secret", "Keep-Alive", "Te", "Proxy-Connection", "Proxy-Authorization"} {
				if v, ok := h[name]; ok {
					t.Errorf("origin saw request header %s: %q", name, v)
				}
			}
			if tt.wantStatus == http.StatusSwitchingProtocols && h.Get("X-End") != "1" {
				t.Errorf("origin saw X-End %q, want 1", h.Get("X-End"))
			}
		})
	}
}

func TestHTTPUpgradeRefusedByProxy(t *testing.T) {
	devCredentials := "Proxy-Authorization: " + basicCredentials("Basic", "dev", "dev-secret")
	tests := []struct {
		name       string
		setup      func(t *testing.T) (proxy, target string, extra []string)
		wantStatus int
		wantBody   string // TARGET stands for the target
	}{
		{
			name: "route rejects",
			setup: func(t *testing.T) (string, string, []string) {
				_, addr := startServer(t, Config{Network: newFakeNetwork(t)}, routePolicy(t).Listeners[1])
				return addr, "blocked.test", []string{devCredentials}
			},
			wantStatus: http.StatusForbidden,
			wantBody:   `iapd: choosing an access point to reach blocked.test:80 for app "dev": policy: connection not allowed: app "dev" rejects blocked.test by routes[1] (domain blocked.test) -> reject (line 19)` + "\n",
		},
		{
			name: "missing credentials",
			setup: func(t *testing.T) (string, string, []string) {
				_, addr := startServer(t, Config{Network: newFakeNetwork(t)}, routePolicy(t).Listeners[1])
				return addr, "web.test", nil
			},
			wantStatus: http.StatusProxyAuthRequired,
			wantBody:   "iapd: proxy authentication required: send the user name and password of an app on this listener\n",
		},
		{
			name: "no usable access point",
			setup: func(t *testing.T) (string, string, []string) {
				bed := newHTTPTestBed(t, httpListenerApp, Config{})
				bed.network.setUnusable("a", "link down")
				bed.network.setUnusable("b", "no carrier")
				return bed.proxy, bed.originTarget(), nil
			},
			wantStatus: http.StatusServiceUnavailable,
			wantBody:   `iapd: choosing an access point to reach TARGET for app "web": network is unreachable: destination "internet": policy: no usable access point (a: link down; b: no carrier)` + "\n",
		},
		{
			name: "app at its connection limit",
			setup: func(t *testing.T) (string, string, []string) {
				hold := startHoldServer(t)
				_, addrs := startServerListeners(t, Config{Network: newFakeNetwork(t)}, parsePolicy(t, limitsPolicy).Listeners)
				openTunnel(t, addrs[3], hold.addr)
				hold.accept(t)
				return addrs[3], "web.test:8080", nil
			},
			wantStatus: http.StatusServiceUnavailable,
			wantBody:   `iapd: destination "a": opening a connection to TARGET for app "capped": proxy: app connection limit reached (max_connections 1)` + "\n",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			proxy, target, extra := tt.setup(t)
			fullTarget := target
			if _, _, err := net.SplitHostPort(target); err != nil {
				fullTarget = net.JoinHostPort(target, "80")
			}
			want := strings.ReplaceAll(tt.wantBody, "TARGET", fullTarget)

			plain := fmt.Sprintf("GET http://%s/ HTTP/1.1\r\nHost: %s\r\n", target, target)
			for _, line := range extra {
				plain += line + "\r\n"
			}
			requests := map[string]string{
				"plain":   plain + "\r\n",
				"upgrade": upgradeRequest(target, "/", "websocket", extra...),
			}
			for _, kind := range []string{"plain", "upgrade"} {
				resp, body, _, _ := rawExchange(t, proxy, requests[kind])
				if resp.StatusCode != tt.wantStatus {
					t.Errorf("%s request: status = %d, want %d", kind, resp.StatusCode, tt.wantStatus)
				}
				if body != want {
					t.Errorf("%s request: body %q\nwant %q", kind, body, want)
				}
				if v, ok := resp.Header["Upgrade"]; ok {
					t.Errorf("%s request: client got Upgrade %q", kind, v)
				}
			}
		})
	}
}

func TestHTTPUpgradeCurl(t *testing.T) {
	requireCurl(t)
	bed := newHTTPTestBed(t, httpListenerApp, Config{})
	origin := startUpgradeOrigin(t)
	_, port, _ := net.SplitHostPort(origin.addr)

	// Debian's curl 7.88 is built without ws://, so the handshake fields
	// are set by hand. curl prints the 101 and then what follows it until
	// the origin closes.
	out, err := runCurl(t, "-i", "-N", "--http1.1",
		"-H", "Connection: Upgrade", "-H", "Upgrade: websocket",
		"-H", "Sec-WebSocket-Version: 13", "-H", "Sec-WebSocket-Key: "+upgradeTestKey,
		"-x", "http://"+bed.proxy, "http://127.0.0.1:"+port+"/switch?close")
	if err != nil {
		t.Fatal(err)
	}
	// Field names are compared without case: http.Server writes them in
	// canonical form (Sec-Websocket-Accept).
	for _, want := range []string{
		"HTTP/1.1 101 Switching Protocols\r\n",
		"Upgrade: websocket\r\n",
		"Connection: Upgrade\r\n",
		"Sec-WebSocket-Accept: " + webSocketAccept(upgradeTestKey) + "\r\n",
		"\r\n\r\n" + string(serverFrame("hello")),
	} {
		if !strings.Contains(strings.ToLower(out), strings.ToLower(want)) {
			t.Errorf("curl output lacks %q:\n%s", want, out)
		}
	}
}
