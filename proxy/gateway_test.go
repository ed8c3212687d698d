package proxy

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	socks5 "github.com/armon/go-socks5"

	"iapd/policy"
)

// testGateway is a gateway proxy on loopback that records the targets
// asked of it, as the client sent them. It reaches only loopback.
type testGateway struct {
	addr string

	mu      sync.Mutex
	targets []string
	ln      net.Listener
}

func (g *testGateway) record(target string) {
	g.mu.Lock()
	g.targets = append(g.targets, target)
	g.mu.Unlock()
}

func (g *testGateway) seen() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.targets)
}

// stop closes the gateway's listener, so that dials to it are refused.
func (g *testGateway) stop() { g.ln.Close() }

// gatewayResolver resolves web.test to loopback for the SOCKS5 gateway and
// records the name.
type gatewayResolver struct{ g *testGateway }

func (r gatewayResolver) Resolve(ctx context.Context, name string) (context.Context, net.IP, error) {
	r.g.record("resolve " + name)
	if name != "web.test" {
		return ctx, nil, fmt.Errorf("gateway: no such host %q", name)
	}
	return ctx, net.IPv4(127, 0, 0, 1), nil
}

// startSOCKS5Gateway runs a SOCKS5 gateway that requires user and password.
func startSOCKS5Gateway(t *testing.T, user, password string) *testGateway {
	t.Helper()
	g := &testGateway{}
	srv, err := socks5.New(&socks5.Config{
		AuthMethods: []socks5.Authenticator{socks5.UserPassAuthenticator{Credentials: socks5.StaticCredentials{user: password}}},
		Resolver:    gatewayResolver{g},
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			g.record("dial " + addr)
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	g.ln = listenLoopback(t)
	g.addr = g.ln.Addr().String()
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(g.ln)
	}()
	t.Cleanup(func() {
		g.ln.Close()
		<-done
	})
	return g
}

// startHTTPGateway runs an HTTP gateway that requires Basic credentials.
// It tunnels CONNECT to loopback targets and answers absolute-form requests
// itself with the URL it was asked for.
func startHTTPGateway(t *testing.T, user, password string) *testGateway {
	t.Helper()
	g := &testGateway{}
	want := basicCredentials("Basic", user, password)
	var tunnels sync.WaitGroup
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Proxy-Authorization") != want {
			w.Header().Set("Proxy-Authenticate", `Basic realm="gateway"`)
			http.Error(w, "gateway: credentials required", http.StatusProxyAuthRequired)
			return
		}
		if r.Method != http.MethodConnect {
			g.record(r.Method + " " + r.URL.String())
			fmt.Fprintf(w, "gateway fetched %s\n", r.URL)
			return
		}
		g.record("CONNECT " + r.Host)
		host, port, _ := net.SplitHostPort(r.Host)
		if host != "web.test" {
			http.Error(w, "gateway: unknown host", http.StatusBadGateway)
			return
		}
		up, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", port))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		client, rw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			up.Close()
			return
		}
		rw.WriteString("HTTP/1.1 200 Connection established\r\n\r\n")
		rw.Flush()
		tunnels.Add(1)
		go func() {
			defer tunnels.Done()
			relayTest(client, up)
		}()
	})}
	g.ln = listenLoopback(t)
	g.addr = g.ln.Addr().String()
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(g.ln)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
		tunnels.Wait()
	})
	return g
}

// relayTest copies both ways between a and b, passing half-closes on.
func relayTest(a, b net.Conn) {
	var wg sync.WaitGroup
	cp := func(dst, src net.Conn) {
		defer wg.Done()
		io.Copy(dst, src)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
	}
	wg.Add(2)
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
	a.Close()
	b.Close()
}

func listenLoopback(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening: %v", err)
	}
	return ln
}

// gatewayPolicy has app web on destination [gw, a]: the gateway while it
// answers, else access point a directly. Listener 0 is SOCKS5, 1 HTTP.
func gatewayPolicy(t *testing.T, scheme, gatewayAddr string) *policy.Policy {
	t.Helper()
	t.Setenv("IAPD_TEST_GATEWAY_PASSWORD", "gw-secret")
	p, err := policy.Parse("gateway.yaml", []byte(`
listeners:
  - listen: "127.0.0.1:0"
    protocol: socks5
    app: web
  - listen: "127.0.0.1:0"
    protocol: http
    app: web
apps:
  web:
    destination: corp-first
    allow_local_targets: true
access_points:
  gw:
    interface: default
    proxy:
      url: "`+scheme+`://`+gatewayAddr+`"
      user: alice
      password_env: IAPD_TEST_GATEWAY_PASSWORD
  a:
    interface: eth-a
    dns: [192.0.2.53]
destinations:
  corp-first:
    access_points: [gw, a]
`))
	if err != nil {
		t.Fatalf("parsing gateway policy: %v", err)
	}
	return p
}

func TestGatewayProxy(t *testing.T) {
	echo := startEchoServer(t, "tcp4")
	_, port, _ := net.SplitHostPort(echo)
	target := "web.test:" + port

	tests := []struct {
		name        string
		scheme      string
		password    string // the gateway's; the policy sends gw-secret
		stopped     bool
		wantSeen    []string // by the gateway
		wantDials   []string // by the fake network
		wantLookups []string
	}{
		{
			name: "socks5", scheme: "socks5", password: "gw-secret",
			wantSeen:  []string{"resolve web.test", "dial 127.0.0.1:" + port},
			wantDials: []string{"gw GATEWAY"},
		},
		{
			name: "http connect", scheme: "http", password: "gw-secret",
			wantSeen:  []string{"CONNECT " + target},
			wantDials: []string{"gw GATEWAY"},
		},
		{
			name: "socks5 wrong password fails over", scheme: "socks5", password: "other",
			wantDials:   []string{"gw GATEWAY", "a 127.0.0.1:" + port},
			wantLookups: []string{"a web.test"},
		},
		{
			name: "http wrong password fails over", scheme: "http", password: "other",
			wantDials:   []string{"gw GATEWAY", "a 127.0.0.1:" + port},
			wantLookups: []string{"a web.test"},
		},
		{
			name: "stopped gateway fails over", scheme: "socks5", password: "gw-secret", stopped: true,
			wantDials:   []string{"gw GATEWAY", "a 127.0.0.1:" + port},
			wantLookups: []string{"a web.test"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var gw *testGateway
			if tt.scheme == "socks5" {
				gw = startSOCKS5Gateway(t, "alice", tt.password)
			} else {
				gw = startHTTPGateway(t, "alice", tt.password)
			}
			if tt.stopped {
				gw.stop()
			}
			p := gatewayPolicy(t, tt.scheme, gw.addr)
			network := newFakeNetwork(t)
			_, addr := startServer(t, Config{Network: network, DialTimeout: 5 * time.Second}, p.Listeners[0])

			c := dialProxy(t, addr)
			c.Write(slices.Concat(greeting(methodNoAuth), request(t, 1, target)))
			if got := readExactly(t, c, 2); !bytes.Equal(got, []byte{5, methodNoAuth}) {
				t.Fatalf("method selection % x, want 05 00", got)
			}
			readSuccess(t, c)
			exchange(t, c, []byte("through the gateway"))

			if got := gw.seen(); !slices.Equal(got, tt.wantSeen) {
				t.Errorf("gateway saw %q, want %q", got, tt.wantSeen)
			}
			var wantDials []string
			for _, d := range tt.wantDials {
				wantDials = append(wantDials, strings.Replace(d, "GATEWAY", gw.addr, 1))
			}
			if got := network.dials(); !slices.Equal(got, wantDials) {
				t.Errorf("dials %q, want %q", got, wantDials)
			}
			// The target's name goes to the gateway, never to a resolver
			// of this host.
			if got := network.resolved(); !slices.Equal(got, tt.wantLookups) {
				t.Errorf("lookups %q, want %q", got, tt.wantLookups)
			}
		})
	}
}

// TestGatewayHTTPAbsoluteForm checks that a plain HTTP request for an app
// whose access point has an HTTP gateway reaches the gateway in absolute
// form with the gateway's credentials, not as a CONNECT tunnel.
func TestGatewayHTTPAbsoluteForm(t *testing.T) {
	gw := startHTTPGateway(t, "alice", "gw-secret")
	p := gatewayPolicy(t, "http", gw.addr)
	network := newFakeNetwork(t)
	_, addr := startServer(t, Config{Network: network}, p.Listeners[1])

	resp, body, _, _ := rawExchange(t, addr, "GET http://intranet.test/page HTTP/1.1\r\nHost: intranet.test\r\n\r\n")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, want 200; body %q", resp.StatusCode, body)
	}
	if want := "gateway fetched http://intranet.test/page\n"; body != want {
		t.Errorf("body %q, want %q", body, want)
	}
	if got, want := gw.seen(), []string{"GET http://intranet.test/page"}; !slices.Equal(got, want) {
		t.Errorf("gateway saw %q, want %q", got, want)
	}
	if got := network.resolved(); len(got) != 0 {
		t.Errorf("lookups %q, want none", got)
	}
}

// routePolicy has app dev, which rejects port 25 and blocked.test, sends
// web6.test to access point b, and lets clients choose b but not c.
// Listener 0 is SOCKS5 with user dev, 1 HTTP with user dev, 2 SOCKS5 of
// app locked, which allows no choice.
func routePolicy(t *testing.T) *policy.Policy {
	t.Helper()
	t.Setenv("IAPD_TEST_DEV_PASSWORD", "dev-secret")
	p, err := policy.Parse("routes.yaml", []byte(`
listeners:
  - listen: "127.0.0.1:0"
    protocol: socks5
    users: [{name: dev, password_env: IAPD_TEST_DEV_PASSWORD, app: dev}]
  - listen: "127.0.0.1:0"
    protocol: http
    users: [{name: dev, password_env: IAPD_TEST_DEV_PASSWORD, app: dev}]
  - listen: "127.0.0.1:0"
    protocol: socks5
    app: locked
apps:
  dev:
    access_point: a
    allow_override: [b]
    routes:
      - port: 25
        reject: true
      - domain: blocked.test
        reject: true
      - domain: web6.test
        access_point: b
    allow_local_targets: true
  locked:
    access_point: a
    allow_local_targets: true
access_points:
  a: {interface: eth-a, dns: [192.0.2.53]}
  b: {interface: eth-b, dns: [198.51.100.53]}
  c: {interface: eth-c, dns: [203.0.113.53]}
`))
	if err != nil {
		t.Fatalf("parsing route policy: %v", err)
	}
	return p
}

func TestRoutesSOCKS5(t *testing.T) {
	echo4 := startEchoServer(t, "tcp4")
	echo6 := startEchoServer(t, "tcp6")
	_, port4, _ := net.SplitHostPort(echo4)
	_, port6, _ := net.SplitHostPort(echo6)

	tests := []struct {
		name      string
		listener  int
		user      string
		target    string
		wantReply byte
		wantDials []string
	}{
		{name: "default destination", user: "dev", target: "web.test:" + port4, wantDials: []string{"a 127.0.0.1:" + port4}},
		{name: "routed name", user: "dev", target: "web6.test:" + port6, wantDials: []string{"b [::1]:" + port6}},
		{name: "rejected port", user: "dev", target: "web.test:25", wantReply: replyNotAllowed},
		{name: "rejected name", user: "dev", target: "blocked.test:" + port4, wantReply: replyNotAllowed},
		{name: "allowed choice", user: "dev+b", target: "web.test:" + port4, wantDials: []string{"b 127.0.0.1:" + port4}},
		{name: "choice outside the allowed list", user: "dev+c", target: "web.test:" + port4, wantReply: replyNotAllowed},
		{name: "choice against a route", user: "dev+a", target: "web6.test:" + port6, wantReply: replyNotAllowed},
		{name: "choice on an app without override", listener: 2, user: "locked+b", target: "web.test:" + port4, wantReply: replyNotAllowed},
		{name: "other user name on an app listener", listener: 2, user: "someone+b", target: "web.test:" + port4, wantDials: []string{"a 127.0.0.1:" + port4}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			network := newFakeNetwork(t)
			p := routePolicy(t)
			_, addr := startServer(t, Config{Network: network}, p.Listeners[tt.listener])
			c := dialProxy(t, addr)

			c.Write(slices.Concat(greeting(methodUserPass), userPass(tt.user, "dev-secret")))
			if got := readExactly(t, c, 4); !bytes.Equal(got, []byte{5, methodUserPass, 1, 0}) {
				t.Fatalf("authentication replies % x, want 05 02 01 00", got)
			}
			c.Write(request(t, 1, tt.target))
			if tt.wantReply != 0 {
				if got := readExactly(t, c, 10); !bytes.Equal(got, failureReply(tt.wantReply)) {
					t.Errorf("reply % x, want % x", got, failureReply(tt.wantReply))
				}
				expectClosed(t, c)
			} else {
				readSuccess(t, c)
				exchange(t, c, []byte("routed"))
			}
			if got := network.dials(); !slices.Equal(got, tt.wantDials) {
				t.Errorf("dials %q, want %q", got, tt.wantDials)
			}
			if tt.wantReply != 0 && len(network.resolved()) != 0 {
				t.Errorf("refused connection looked up %q", network.resolved())
			}
		})
	}
}

func TestRoutesHTTP(t *testing.T) {
	tests := []struct {
		name       string
		request    string
		wantStatus int
		wantBody   string
	}{
		{
			name:       "connect rejected port",
			request:    "CONNECT web.test:25 HTTP/1.1\r\nHost: web.test:25\r\nProxy-Authorization: " + basicCredentials("Basic", "dev", "dev-secret") + "\r\n\r\n",
			wantStatus: http.StatusForbidden,
			wantBody:   `iapd: choosing an access point to reach web.test:25 for app "dev": policy: connection not allowed: app "dev" rejects web.test by routes[0] (port 25) -> reject (line 17)` + "\n",
		},
		{
			name:       "get rejected name",
			request:    "GET http://blocked.test/ HTTP/1.1\r\nHost: blocked.test\r\nProxy-Authorization: " + basicCredentials("Basic", "dev", "dev-secret") + "\r\n\r\n",
			wantStatus: http.StatusForbidden,
			wantBody:   `iapd: choosing an access point to reach blocked.test:80 for app "dev": policy: connection not allowed: app "dev" rejects blocked.test by routes[1] (domain blocked.test) -> reject (line 19)` + "\n",
		},
		{
			name:       "get choice refused",
			request:    "GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\nProxy-Authorization: " + basicCredentials("Basic", "dev+c", "dev-secret") + "\r\n\r\n",
			wantStatus: http.StatusForbidden,
			wantBody:   `iapd: choosing an access point to reach web.test:80 for app "dev": policy: connection not allowed: app "dev" does not allow choosing "c"` + "\n",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			network := newFakeNetwork(t)
			p := routePolicy(t)
			_, addr := startServer(t, Config{Network: network}, p.Listeners[1])
			resp, body, _, _ := rawExchange(t, addr, tt.request)
			if resp.StatusCode != tt.wantStatus {
				t.Errorf("status %d, want %d", resp.StatusCode, tt.wantStatus)
			}
			if body != tt.wantBody {
				t.Errorf("body %q\nwant %q", body, tt.wantBody)
			}
			if got := network.dials(); len(got) != 0 {
				t.Errorf("dials %q, want none", got)
			}
		})
	}
}
