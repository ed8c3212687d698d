package proxy

import (
	"bufio"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"iapd/policy"
)

// Listeners of testPolicy that the HTTP tests use.
const (
	httpListenerMixed = 2 // app web
	httpListenerApp   = 3 // app web
	httpListenerUsers = 4 // alice (app mail, access point b) and bob (app web)
)

// httpSources are the loopback source addresses that the access points'
// dialers bind in the HTTP tests, so that an origin server can tell from a
// request's remote address which access point dialled its connection.
var httpSources = map[string]string{"a": "127.0.0.2", "b": "127.0.0.3"}

// httpSourceNetwork is the package's fake network with dialers that bind
// the source address of their access point.
type httpSourceNetwork struct{ *fakeNetwork }

func (n httpSourceNetwork) Dialer(ap *policy.AccessPoint) Dialer {
	return httpSourceDialer{fakeDialer{n.fakeNetwork, ap.Name}}
}

type httpSourceDialer struct{ fakeDialer }

func (d httpSourceDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	d.f.mu.Lock()
	b := d.f.behaviour[d.ap]
	d.f.mu.Unlock()
	if b != dialOK {
		return d.fakeDialer.DialContext(ctx, network, address)
	}

	d.f.mu.Lock()
	d.f.dialed = append(d.f.dialed, d.ap+" "+address)
	d.f.mu.Unlock()
	host, _, err := net.SplitHostPort(address)
	if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
		d.f.t.Errorf("dialer of %s asked for %q, which is not a loopback address", d.ap, address)
		return nil, errors.New("fake network: not a loopback address")
	}
	nd := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(httpSources[d.ap])}}
	return nd.DialContext(ctx, network, address)
}

// httpTestBed is a proxy serving one listener of testPolicy, the fake
// network under it and an origin server reachable as web.test.
type httpTestBed struct {
	s       *Server
	proxy   string // address of the proxy listener
	l       *policy.Listener
	network *fakeNetwork
	origin  *httpOrigin
}

// newHTTPTestBed serves the listener of testPolicy at index listener with
// cfg, whose Network it sets.
func newHTTPTestBed(t *testing.T, listener int, cfg Config) *httpTestBed {
	t.Helper()
	return newHTTPTestBedWith(t, testPolicy(t), listener, cfg)
}

// newHTTPTestBedWith is newHTTPTestBed with a policy of the same listeners.
func newHTTPTestBedWith(t *testing.T, p *policy.Policy, listener int, cfg Config) *httpTestBed {
	t.Helper()
	fn := newFakeNetwork(t)
	l := p.Listeners[listener]
	cfg.Network = httpSourceNetwork{fn}
	s, addr := startServer(t, cfg, l)
	return &httpTestBed{s: s, proxy: addr, l: l, network: fn, origin: startHTTPOrigin(t)}
}

// originURL returns the URL of path on the origin, by its test name.
func (b *httpTestBed) originURL(path string) string {
	return "http://" + b.originTarget() + path
}

// originTarget returns host:port of the origin, by its test name.
func (b *httpTestBed) originTarget() string {
	_, port, _ := net.SplitHostPort(b.origin.addr)
	return net.JoinHostPort("web.test", port)
}

// httpRequestSeen is what the origin server recorded about one request.
type httpRequestSeen struct {
	path   string
	host   string // Host of the request
	source string // IP of the connection the request came in on
	remote string // IP:port of that connection
	header http.Header
	body   string
}

// httpOrigin is an HTTP server on 127.0.0.1 that records every request and
// responds "origin saw PATH". On path /hop the response carries hop-by-hop
// headers, /untyped has neither Content-Type nor Date, /stream sends a line and the next only after release is closed,
// /reset closes the connection without a response, and /nolength sends a
// body of 10000 bytes without a length, ended by closing the connection.
type httpOrigin struct {
	addr    string
	release chan struct{} // closed by the test to let /stream send its second line

	mu   sync.Mutex
	seen []httpRequestSeen // guarded by mu
}

func startHTTPOrigin(t *testing.T) *httpOrigin {
	t.Helper()
	o := &httpOrigin{release: make(chan struct{})}
	srv := httptest.NewServer(http.HandlerFunc(o.serveHTTP))
	t.Cleanup(srv.Close)
	o.addr = srv.Listener.Addr().String()
	return o
}

func (o *httpOrigin) serveHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	source, _, _ := net.SplitHostPort(r.RemoteAddr)
	o.mu.Lock()
	o.seen = append(o.seen, httpRequestSeen{path: r.URL.Path, host: r.Host, source: source, remote: r.RemoteAddr, header: r.Header.Clone(), body: string(body)})
	o.mu.Unlock()

	switch r.URL.Path {
	case "/hop":
		w.Header().Set("Connection", "X-Origin-Hop")
		w.Header().Set("X-Origin-Hop", "1")
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Set("Proxy-Authenticate", `Basic realm="origin"`)
		w.Header().Set("X-Origin-End", "1")
	case "/stream":
		io.WriteString(w, "first\n")
		http.NewResponseController(w).Flush()
		select {
		case <-o.release:
		case <-time.After(5 * time.Second):
		}
		io.WriteString(w, "second\n")
		return
	case "/reset":
		c, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			c.Close()
		}
		return
	case "/untyped":
		// No Content-Type and no Date: present and empty, http.Server
		// adds neither.
		w.Header()["Content-Type"] = nil
		w.Header()["Date"] = nil
		io.WriteString(w, "<html><body>untyped</body></html>")
		return
	case "/nolength":
		// An HTTP/1.0 style response: no length, the end of the body is
		// the end of the connection.
		c, buf, err := http.NewResponseController(w).Hijack()
		if err == nil {
			buf.WriteString("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
			buf.WriteString(strings.Repeat("no length ", 1000))
			buf.Flush()
			c.Close()
		}
		return
	}
	fmt.Fprintf(w, "origin saw %s", r.URL.Path)
}

func (o *httpOrigin) requests() []httpRequestSeen {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.seen)
}

// runCurl runs curl with args and no configuration file or proxy
// variables, and returns its stdout. A nonzero exit is returned as err
// with curl's stderr.
func runCurl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command("curl", append([]string{"-q", "--silent", "--show-error", "--max-time", "10"}, args...)...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("curl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

func requireCurl(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl is not installed")
	}
}

// rawExchange writes request to the proxy in one write and reads one
// response. A CONNECT response is read as one, so that a 2xx has no body.
// The connection is returned open with its reader.
func rawExchange(t *testing.T, proxy, request string) (*http.Response, string, net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", proxy)
	if err != nil {
		t.Fatalf("dialling proxy: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, request); err != nil {
		t.Fatalf("writing request: %v", err)
	}

	br := bufio.NewReader(c)
	method, _, _ := strings.Cut(request, " ")
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("reading response to %q: %v", request, err)
	}
	if method == http.MethodConnect && resp.StatusCode/100 == 2 {
		// http.ReadResponse would take the tunnel for the body.
		return resp, "", c, br
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading response body: %v", err)
	}
	return resp, string(body), c, br
}

func basicCredentials(scheme, user, password string) string {
	return scheme + " " + base64.StdEncoding.EncodeToString([]byte(user+":"+password))
}

func TestHTTPPlainGET(t *testing.T) {
	requireCurl(t)
	tests := []struct {
		name     string
		listener int
	}{
		{name: "http listener", listener: httpListenerApp},
		{name: "mixed listener", listener: httpListenerMixed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bed := newHTTPTestBed(t, tt.listener, Config{})
			out, err := runCurl(t, "-x", "http://"+bed.proxy, bed.originURL("/plain"))
			if err != nil {
				t.Fatal(err)
			}
			if out != "origin saw /plain" {
				t.Errorf("body = %q, want %q", out, "origin saw /plain")
			}

			_, port, _ := net.SplitHostPort(bed.origin.addr)
			if got, want := bed.network.dials(), []string{"a 127.0.0.1:" + port}; !slices.Equal(got, want) {
				t.Errorf("dials = %q, want %q", got, want)
			}
			seen := bed.origin.requests()
			if len(seen) != 1 || seen[0].source != httpSources["a"] {
				t.Errorf("origin saw %+v, want one request from %s", seen, httpSources["a"])
			}
		})
	}
}

func TestHTTPStreamedResponse(t *testing.T) {
	tests := []struct {
		name  string
		proto string
	}{
		{name: "http/1.1 client", proto: "HTTP/1.1"},
		{name: "http/1.0 client", proto: "HTTP/1.0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bed := newHTTPTestBed(t, httpListenerApp, Config{})
			c, err := net.Dial("tcp", bed.proxy)
			if err != nil {
				t.Fatalf("dialling proxy: %v", err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * time.Second))
			fmt.Fprintf(c, "GET %s %s\r\nHost: %s\r\n\r\n", bed.originURL("/stream"), tt.proto, bed.originTarget())

			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatalf("reading response: %v", err)
			}
			br := bufio.NewReader(resp.Body)
			// The first line must arrive while the origin still holds the second.
			first, err := br.ReadString('\n')
			if err != nil || first != "first\n" {
				t.Fatalf("first line = %q, %v; want %q", first, err, "first\n")
			}
			close(bed.origin.release)
			rest, err := io.ReadAll(br)
			if err != nil || string(rest) != "second\n" {
				t.Errorf("rest = %q, %v; want %q", rest, err, "second\n")
			}
		})
	}
}

func TestHTTPConnectTunnel(t *testing.T) {
	requireCurl(t)
	bed := newHTTPTestBed(t, httpListenerApp, Config{})
	out, err := runCurl(t, "-p", "-x", "http://"+bed.proxy, "-w", "\n%{http_connect} %{http_code}", bed.originURL("/tunnel"))
	if err != nil {
		t.Fatal(err)
	}
	if want := "origin saw /tunnel\n200 200"; out != want {
		t.Errorf("curl output = %q, want %q", out, want)
	}
	seen := bed.origin.requests()
	if len(seen) != 1 || seen[0].source != httpSources["a"] {
		t.Errorf("origin saw %+v, want one request from %s", seen, httpSources["a"])
	}
}

func TestHTTPCredentials(t *testing.T) {
	requireCurl(t)
	tests := []struct {
		name     string
		args     []string // curl arguments for the credentials
		tunnel   bool     // CONNECT (curl -p) instead of a plain request
		wantCode string   // "%{http_connect} %{http_code}"
		wantFrom string   // access point whose source address the origin records; "" for no request
	}{
		{name: "right plain", args: []string{"-U", "bob:bob-secret"}, wantCode: "000 200", wantFrom: "a"},
		{name: "right connect", args: []string{"-U", "alice:alice-secret"}, tunnel: true, wantCode: "200 200", wantFrom: "b"},
		{name: "lowercase scheme plain", args: []string{"--proxy-header", "Proxy-Authorization: " + basicCredentials("basic", "bob", "bob-secret")}, wantCode: "000 200", wantFrom: "a"},
		{name: "lowercase scheme connect", args: []string{"--proxy-header", "Proxy-Authorization: " + basicCredentials("bASIC", "bob", "bob-secret")}, tunnel: true, wantCode: "200 200", wantFrom: "a"},
		{name: "wrong password plain", args: []string{"-U", "bob:alice-secret"}, wantCode: "000 407"},
		{name: "wrong password connect", args: []string{"-U", "bob:alice-secret"}, tunnel: true, wantCode: "407 000"},
		{name: "unknown user", args: []string{"-U", "carol:bob-secret"}, wantCode: "000 407"},
		{name: "missing plain", wantCode: "000 407"},
		{name: "missing connect", tunnel: true, wantCode: "407 000"},
		{name: "other scheme", args: []string{"--proxy-header", "Proxy-Authorization: Bearer bob-secret"}, wantCode: "000 407"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bed := newHTTPTestBed(t, httpListenerUsers, Config{})
			args := append([]string{"-x", "http://" + bed.proxy, "-D", "-", "-w", "\n%{http_connect} %{http_code}"}, tt.args...)
			if tt.tunnel {
				args = append(args, "-p")
			}
			out, err := runCurl(t, append(args, bed.originURL("/auth"))...)
			if tt.wantFrom != "" && err != nil {
				t.Fatal(err)
			}
			if tt.wantFrom == "" && tt.tunnel && (err == nil || !strings.Contains(err.Error(), "CONNECT tunnel failed, response 407")) {
				t.Errorf("curl error = %v, want a failed tunnel with response 407", err)
			}

			lines := strings.Split(strings.TrimSpace(out), "\n")
			if got := lines[len(lines)-1]; got != tt.wantCode {
				t.Errorf("codes = %q, want %q", got, tt.wantCode)
			}
			seen := bed.origin.requests()
			if tt.wantFrom == "" {
				if !strings.Contains(out, "Proxy-Authenticate: Basic realm=\"iapd\"") {
					t.Errorf("response headers lack the Basic challenge:\n%s", out)
				}
				if dials := bed.network.dials(); len(dials) != 0 {
					t.Errorf("dials = %q, want none", dials)
				}
				if len(seen) != 0 {
					t.Errorf("origin saw %d requests, want none", len(seen))
				}
				return
			}
			if len(seen) != 1 {
				t.Fatalf("origin saw %d requests, want 1", len(seen))
			}
			if seen[0].source != httpSources[tt.wantFrom] {
				t.Errorf("origin saw the request from %s, want %s (access point %s)", seen[0].source, httpSources[tt.wantFrom], tt.wantFrom)
			}
			if v := seen[0].header.Get("Proxy-Authorization"); v != "" {
				t.Errorf("origin saw Proxy-Authorization %q", v)
			}
		})
	}
}

func TestHTTPHopByHopHeaders(t *testing.T) {
	bed := newHTTPTestBed(t, httpListenerApp, Config{})
	request := "GET " + bed.originURL("/hop") + " HTTP/1.1\r\n" +
		"Host: " + bed.originTarget() + "\r\n" +
		"Connection: X-Secret, keep-alive\r\n" +
		"X-Secret: 1\r\n" +
		"Keep-Alive: timeout=5\r\n" +
		"Proxy-Connection: keep-alive\r\n" +
		"Proxy-Authorization: " + basicCredentials("Basic", "bob", "bob-secret") + "\r\n" +
		"Te: trailers\r\n" +
		"Trailer: X-Late\r\n" +
		"Upgrade: websocket\r\n" +
		"Accept-Encoding: gzip\r\n" +
		"X-End: 1\r\n\r\n"
	resp, body, _, _ := rawExchange(t, bed.proxy, request)
	if resp.StatusCode != http.StatusOK || body != "origin saw /hop" {
		t.Fatalf("response = %d %q, want 200 %q", resp.StatusCode, body, "origin saw /hop")
	}

	seen := bed.origin.requests()
	if len(seen) != 1 {
		t.Fatalf("origin saw %d requests, want 1", len(seen))
	}
	for _, name := range []string{"X-Secret", "Keep-Alive", "Proxy-Connection", "Proxy-Authorization", "Te", "Trailer", "Upgrade"} {
		if v, ok := seen[0].header[name]; ok {
			t.Errorf("origin saw request header %s: %q", name, v)
		}
	}
	if c := seen[0].header.Get("Connection"); c != "" && !strings.EqualFold(c, "keep-alive") {
		t.Errorf("origin saw Connection %q, want none of the client's", c)
	}
	for name, want := range map[string]string{"X-End": "1", "Accept-Encoding": "gzip"} {
		if got := seen[0].header.Get(name); got != want {
			t.Errorf("origin saw %s %q, want %q", name, got, want)
		}
	}

	for _, name := range []string{"X-Origin-Hop", "Keep-Alive", "Proxy-Authenticate"} {
		if v, ok := resp.Header[name]; ok {
			t.Errorf("client got response header %s: %q", name, v)
		}
	}
	if c := resp.Header.Get("Connection"); c != "" {
		t.Errorf("client got Connection %q, want none", c)
	}
	if got := resp.Header.Get("X-Origin-End"); got != "1" {
		t.Errorf("client got X-Origin-End %q, want %q", got, "1")
	}
}

// TestHTTPAddsNoHeaders checks that a plain request and its response pass
// without the fields net/http would add: no User-Agent on a request that
// had none, no sniffed Content-Type on a response that had none. A
// response without Date gets one, as a proxy must add it.
func TestHTTPAddsNoHeaders(t *testing.T) {
	bed := newHTTPTestBed(t, httpListenerApp, Config{})
	tests := []struct {
		name      string
		userAgent string // "" for none
	}{
		{name: "without user agent"},
		{name: "with user agent", userAgent: "curl/8.0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			request := "GET " + bed.originURL("/untyped") + " HTTP/1.1\r\nHost: " + bed.originTarget() + "\r\n"
			if tt.userAgent != "" {
				request += "User-Agent: " + tt.userAgent + "\r\n"
			}
			request += "Proxy-Authorization: " + basicCredentials("Basic", "bob", "bob-secret") + "\r\n\r\n"
			before := len(bed.origin.requests())
			resp, body, _, _ := rawExchange(t, bed.proxy, request)
			if resp.StatusCode != http.StatusOK || body != "<html><body>untyped</body></html>" {
				t.Fatalf("response = %d %q, want 200 and the origin's body", resp.StatusCode, body)
			}

			seen := bed.origin.requests()
			if len(seen) != before+1 {
				t.Fatalf("origin saw %d new requests, want 1", len(seen)-before)
			}
			if got, ok := seen[before].header["User-Agent"]; tt.userAgent == "" && ok {
				t.Errorf("origin saw User-Agent %q, want none", got)
			}
			if got := seen[before].header.Get("User-Agent"); got != tt.userAgent {
				t.Errorf("origin saw User-Agent %q, want %q", got, tt.userAgent)
			}
			if got, ok := resp.Header["Content-Type"]; ok {
				t.Errorf("client got Content-Type %q, want none", got)
			}
			if resp.Header.Get("Date") == "" {
				t.Errorf("client got no Date, want the one a proxy adds")
			}
		})
	}
}

func TestHTTPConnectEarlyBytes(t *testing.T) {
	bed := newHTTPTestBed(t, httpListenerApp, Config{})
	_, port, _ := net.SplitHostPort(startEchoServer(t, "tcp4"))
	target := net.JoinHostPort("web.test", port)

	// The tunnel's first bytes travel in the same write as the request, as
	// a TLS client that does not wait for the 200 sends its ClientHello.
	resp, _, c, br := rawExchange(t, bed.proxy, "CONNECT "+target+" HTTP/1.1\r\nHost: "+target+"\r\n\r\nearly bytes")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT status = %d, want 200", resp.StatusCode)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatalf("half-closing: %v", err)
	}
	got, err := io.ReadAll(br)
	if err != nil {
		t.Fatalf("reading tunnel: %v", err)
	}
	if string(got) != "echo:early bytes" {
		t.Errorf("tunnel returned %q, want %q", got, "echo:early bytes")
	}
}

func TestHTTPTunnelOutlivesHandshakeTimeout(t *testing.T) {
	bed := newHTTPTestBed(t, httpListenerApp, Config{HandshakeTimeout: 100 * time.Millisecond})
	_, port, _ := net.SplitHostPort(startEchoServer(t, "tcp4"))
	target := net.JoinHostPort("web.test", port)

	resp, _, c, br := rawExchange(t, bed.proxy, "CONNECT "+target+" HTTP/1.1\r\nHost: "+target+"\r\n\r\n")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT status = %d, want 200", resp.StatusCode)
	}
	// The header read deadline must not carry over into the tunnel.
	time.Sleep(300 * time.Millisecond)
	if _, err := io.WriteString(c, "late"); err != nil {
		t.Fatalf("writing into tunnel: %v", err)
	}
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(br)
	if err != nil || string(got) != "echo:late" {
		t.Errorf("tunnel returned %q, %v; want %q", got, err, "echo:late")
	}
}

func TestHTTPConnectTable(t *testing.T) {
	bed := newHTTPTestBed(t, httpListenerApp, Config{})
	_, port, _ := net.SplitHostPort(startEchoServer(t, "tcp4"))
	target := net.JoinHostPort("web.test", port)
	kernelBefore, userBefore := relayCopies.Kernel.Load(), relayCopies.User.Load()

	resp, _, c, br := rawExchange(t, bed.proxy, "CONNECT "+target+" HTTP/1.1\r\nHost: "+target+"\r\n\r\n")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT status = %d, want 200", resp.StatusCode)
	}
	if _, err := io.WriteString(c, "ping"); err != nil {
		t.Fatalf("writing into tunnel: %v", err)
	}
	waitFor(t, "the tunnel in the table", func() bool { return len(bed.s.Conns()) == 1 })

	row := bed.s.Conns()[0]
	want := ConnInfo{ID: row.ID, App: "web", Listener: bed.l.Listen, Target: target, Destination: "internet", AccessPoint: "a", Interface: "eth-a", Started: row.Started}
	if row.BytesUp, row.BytesDown = 0, 0; row != want {
		t.Errorf("table row = %+v, want %+v", row, want)
	}

	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(br)
	if err != nil || string(got) != "echo:ping" {
		t.Fatalf("tunnel returned %q, %v; want %q", got, err, "echo:ping")
	}
	waitFor(t, "the tunnel to leave the table", func() bool { return len(bed.s.Conns()) == 0 })

	// Both directions of the relay should have gone through the kernel copy.
	if k := relayCopies.Kernel.Load() - kernelBefore; k != 2 {
		t.Errorf("kernel copies = %d, want 2", k)
	}
	if u := relayCopies.User.Load() - userBefore; u != 0 {
		t.Errorf("user-space copies = %d, want 0", u)
	}
}

// proxyClient returns an HTTP client that sends every request through
// proxy, with user info from proxyURL, and keeps its connections alive.
func proxyClient(t *testing.T, proxyURL string) *http.Client {
	t.Helper()
	u, err := url.Parse(proxyURL)
	if err != nil {
		t.Fatalf("parsing proxy URL: %v", err)
	}
	tr := &http.Transport{Proxy: http.ProxyURL(u), MaxIdleConnsPerHost: 1}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

func getBody(t *testing.T, client *http.Client, target string) string {
	t.Helper()
	resp, err := client.Get(target)
	if err != nil {
		t.Fatalf("GET %s: %v", target, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading body of %s: %v", target, err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: status %d: %s", target, resp.StatusCode, body)
	}
	return string(body)
}

func TestHTTPKeepAliveSeparation(t *testing.T) {
	t.Run("two apps in turn", func(t *testing.T) {
		bed := newHTTPTestBed(t, httpListenerUsers, Config{})
		clients := map[string]*http.Client{
			"bob":   proxyClient(t, "http://bob:bob-secret@"+bed.proxy),
			"alice": proxyClient(t, "http://alice:alice-secret@"+bed.proxy),
		}
		order := []string{"bob", "alice", "bob", "alice", "bob"}
		for i, user := range order {
			getBody(t, clients[user], bed.originURL(fmt.Sprintf("/%d", i)))
		}

		// bob's app web prefers access point a; alice's app mail has b only.
		wantSource := map[string]string{"bob": httpSources["a"], "alice": httpSources["b"]}
		remotes := map[string]map[string]bool{}
		seen := bed.origin.requests()
		if len(seen) != len(order) {
			t.Fatalf("origin saw %d requests, want %d", len(seen), len(order))
		}
		for i, r := range seen {
			user := order[i]
			if r.source != wantSource[user] {
				t.Errorf("request %d of %s came from %s, want %s", i, user, r.source, wantSource[user])
			}
			if remotes[user] == nil {
				remotes[user] = map[string]bool{}
			}
			remotes[user][r.remote] = true
		}
		// One upstream connection per app shows that keep-alive was in play.
		for user, conns := range remotes {
			if len(conns) != 1 {
				t.Errorf("%s's requests came on %d upstream connections, want 1 kept alive", user, len(conns))
			}
		}
	})

	t.Run("access point switch", func(t *testing.T) {
		bed := newHTTPTestBed(t, httpListenerApp, Config{})
		client := proxyClient(t, "http://"+bed.proxy)
		getBody(t, client, bed.originURL("/first"))
		getBody(t, client, bed.originURL("/second"))
		// a's pooled connection is idle now; the next request must not use it.
		bed.network.setUnusable("a", "link down")
		getBody(t, client, bed.originURL("/third"))

		seen := bed.origin.requests()
		var got []string
		for _, r := range seen {
			got = append(got, r.path+" "+r.source)
		}
		want := []string{"/first " + httpSources["a"], "/second " + httpSources["a"], "/third " + httpSources["b"]}
		if !slices.Equal(got, want) {
			t.Errorf("origin saw %q, want %q", got, want)
		}
	})
}

func TestHTTPFailover(t *testing.T) {
	tests := []struct {
		name   string
		method string
		body   string
	}{
		{name: "get", method: http.MethodGet},
		{name: "post with body", method: http.MethodPost, body: "payload that must arrive once"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bed := newHTTPTestBed(t, httpListenerApp, Config{})
			bed.network.setDial("a", dialRefuse)

			req, err := http.NewRequest(tt.method, bed.originURL("/failover"), strings.NewReader(tt.body))
			if err != nil {
				t.Fatal(err)
			}
			resp, err := proxyClient(t, "http://"+bed.proxy).Do(req)
			if err != nil {
				t.Fatalf("%s through proxy: %v", tt.method, err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || string(body) != "origin saw /failover" {
				t.Fatalf("response = %d %q, want 200 %q", resp.StatusCode, body, "origin saw /failover")
			}

			_, port, _ := net.SplitHostPort(bed.origin.addr)
			if got, want := bed.network.dials(), []string{"a 127.0.0.1:" + port, "b 127.0.0.1:" + port}; !slices.Equal(got, want) {
				t.Errorf("dials = %q, want %q", got, want)
			}
			seen := bed.origin.requests()
			if len(seen) != 1 || seen[0].source != httpSources["b"] || seen[0].body != tt.body {
				t.Errorf("origin saw %+v, want one request from %s with body %q", seen, httpSources["b"], tt.body)
			}
		})
	}

	t.Run("no failover after sending", func(t *testing.T) {
		bed := newHTTPTestBed(t, httpListenerApp, Config{})
		resp, body, _, _ := rawExchange(t, bed.proxy, "GET "+bed.originURL("/reset")+" HTTP/1.1\r\nHost: "+bed.originTarget()+"\r\n\r\n")
		if resp.StatusCode != http.StatusBadGateway {
			t.Errorf("status = %d, want 502", resp.StatusCode)
		}
		if !strings.Contains(body, "EOF") {
			t.Errorf("body = %q, want the upstream's EOF", body)
		}
		_, port, _ := net.SplitHostPort(bed.origin.addr)
		if got, want := bed.network.dials(), []string{"a 127.0.0.1:" + port}; !slices.Equal(got, want) {
			t.Errorf("dials = %q, want %q", got, want)
		}
	})
}

func TestHTTPDialErrors(t *testing.T) {
	tests := []struct {
		name       string
		setup      func(*fakeNetwork)
		wantStatus int
		wantBody   []string // substrings; TARGET stands for the origin's host:port
	}{
		{
			name: "no usable access point",
			setup: func(n *fakeNetwork) {
				n.setUnusable("a", "link down")
				n.setUnusable("b", "no carrier")
			},
			wantStatus: http.StatusServiceUnavailable,
			wantBody:   []string{"TARGET", `destination "internet"`, "no usable access point", "a: link down", "b: no carrier"},
		},
		{
			name: "refused",
			setup: func(n *fakeNetwork) {
				n.setDial("a", dialRefuse)
				n.setDial("b", dialRefuse)
			},
			wantStatus: http.StatusBadGateway,
			wantBody:   []string{"TARGET", `destination "internet"`, `access point "a"`, "connection refused"},
		},
		{
			name: "timeout",
			setup: func(n *fakeNetwork) {
				n.setDial("a", dialHang)
				n.setDial("b", dialHang)
			},
			wantStatus: http.StatusGatewayTimeout,
			wantBody:   []string{"TARGET", `destination "internet"`, "deadline exceeded"},
		},
	}
	for _, tt := range tests {
		for _, method := range []string{http.MethodGet, http.MethodConnect} {
			t.Run(tt.name+" "+method, func(t *testing.T) {
				bed := newHTTPTestBed(t, httpListenerApp, Config{DialTimeout: 300 * time.Millisecond})
				tt.setup(bed.network)
				target := bed.originTarget()
				uri := bed.originURL("/")
				if method == http.MethodConnect {
					uri = target
				}

				resp, body, _, _ := rawExchange(t, bed.proxy, method+" "+uri+" HTTP/1.1\r\nHost: "+target+"\r\n\r\n")
				if resp.StatusCode != tt.wantStatus {
					t.Errorf("status = %d, want %d", resp.StatusCode, tt.wantStatus)
				}
				if resp.ContentLength != int64(len(body)) || resp.ContentLength == 0 {
					t.Errorf("Content-Length = %d for a body of %d bytes", resp.ContentLength, len(body))
				}
				if !resp.Close {
					t.Errorf("response does not close the connection")
				}
				for _, want := range tt.wantBody {
					want = strings.ReplaceAll(want, "TARGET", target)
					if !strings.Contains(body, want) {
						t.Errorf("body %q lacks %q", body, want)
					}
				}
				if len(bed.origin.requests()) != 0 {
					t.Errorf("origin saw a request")
				}
			})
		}
	}
}

func TestHTTPBadRequests(t *testing.T) {
	tests := []struct {
		name       string
		request    string
		wantStatus int
		wantBody   string
	}{
		{
			name:       "origin form",
			request:    "GET /index.html HTTP/1.1\r\nHost: web.test\r\n\r\n",
			wantStatus: http.StatusBadRequest,
			wantBody:   "iapd is a proxy: send requests in absolute form (GET http://host/path) or use CONNECT host:port\n",
		},
		{
			name:       "connect without port",
			request:    "CONNECT web.test HTTP/1.1\r\nHost: web.test\r\n\r\n",
			wantStatus: http.StatusBadRequest,
			wantBody:   "iapd: CONNECT target \"web.test\" is not host:port\n",
		},
		{
			name:       "unsupported scheme",
			request:    "GET ftp://web.test/file HTTP/1.1\r\nHost: web.test\r\n\r\n",
			wantStatus: http.StatusBadRequest,
			wantBody:   "iapd: scheme \"ftp\" is not supported: request http:// URLs or use CONNECT\n",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bed := newHTTPTestBed(t, httpListenerApp, Config{})
			resp, body, _, _ := rawExchange(t, bed.proxy, tt.request)
			if resp.StatusCode != tt.wantStatus {
				t.Errorf("status = %d, want %d", resp.StatusCode, tt.wantStatus)
			}
			if body != tt.wantBody {
				t.Errorf("body = %q, want %q", body, tt.wantBody)
			}
			if dials := bed.network.dials(); len(dials) != 0 {
				t.Errorf("dials = %q, want none", dials)
			}
		})
	}
}

// lockedWriter collects log output from the server's goroutines.
type lockedWriter struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(p)
}

func (w *lockedWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// TestHTTPLogsServedRequest checks that a plain request served over a
// pooled upstream connection gets a debug line with its app and access
// point, as a tunnel gets one when it closes.
func TestHTTPLogsServedRequest(t *testing.T) {
	var logs lockedWriter
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	bed := newHTTPTestBed(t, httpListenerApp, Config{Logger: logger})
	request := "GET " + bed.originURL("/logged") + " HTTP/1.1\r\nHost: " + bed.originTarget() + "\r\n" +
		"Proxy-Authorization: " + basicCredentials("Basic", "bob", "bob-secret") + "\r\n\r\n"
	resp, _, _, _ := rawExchange(t, bed.proxy, request)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, want 200", resp.StatusCode)
	}

	var line string
	for l := range strings.SplitSeq(logs.String(), "\n") {
		if strings.Contains(l, "msg=\"request served\"") {
			line = l
		}
	}
	if line == "" {
		t.Fatalf("no \"request served\" line in the log:\n%s", logs.String())
	}
	for _, want := range []string{"app=", "access_point=", "target=web.test:", "method=GET", "status=200"} {
		if !strings.Contains(line, want) {
			t.Errorf("log line %q lacks %q", line, want)
		}
	}
}
