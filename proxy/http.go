package proxy

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/elazarl/goproxy"

	"iapd/internal/logkey"
	"iapd/policy"
)

// httpClientIdleTimeout is how long an idle keep-alive client connection
// waits for its next request before it is closed, unless the idle timeout
// is shorter.
const httpClientIdleTimeout = 2 * time.Minute

// httpFrontend is the HTTP proxy front end of one listener: a goproxy
// ProxyHttpServer behind an http.Server that is fed the connections core
// accepts. It serves absolute-form requests through one http.Transport per
// app and access point, and CONNECT through s.dial. It is safe for
// concurrent use; close releases everything it holds.
type httpFrontend struct {
	s   *Server
	l   *policy.Listener
	log *slog.Logger

	proxy  *goproxy.ProxyHttpServer
	srv    *http.Server
	ln     *chanListener
	served chan struct{} // closed when srv.Serve has returned

	mu         sync.Mutex
	closed     bool                             // guarded by mu
	clients    map[net.Conn]*servedConn         // guarded by mu; connections between serveConn and their end
	transports map[transportKey]*http.Transport // guarded by mu; created on first use, kept until close
}

// servedConn is the state of one client connection handed to serveConn.
type servedConn struct {
	raw      net.Conn      // as accepted
	conn     *clientConn   // raw as http.Server and goproxy see it
	done     chan struct{} // closed by finish, which releases serveConn
	once     sync.Once
	hijacked atomic.Bool // goproxy took the connection away from http.Server
	tunnel   atomic.Bool // a CONNECT tunnel owns the connection: its dial succeeded
	up       *upstream   // the tunnel's upstream; set before tunnel
	released atomic.Bool // goproxy's relay has returned; the tunnel is iapd's to relay

	// upgraded is the upstream of a request whose origin switched
	// protocols, from roundTripUpgrade to serveHTTP. Both run on
	// http.Server's goroutine of this connection.
	upgraded *upgradedUpstream

	// calls carries work from http.Server's goroutine of this connection
	// to serveConn's, which runs it. A dial passes through deep frames;
	// serveConn runs on a handshake worker whose stack has grown already,
	// while http.Server starts a goroutine with a small stack for every
	// connection, which would copy its stack as it grows.
	calls chan func()
}

func (c *servedConn) finish() { c.once.Do(func() { close(c.done) }) }

// run calls fn on serveConn's goroutine and returns when fn has returned.
// Once serveConn has stopped taking calls, it calls fn itself.
func (c *servedConn) run(fn func()) {
	ran := make(chan struct{})
	select {
	case c.calls <- func() { fn(); close(ran) }:
		<-ran
	case <-c.done:
		fn()
	}
}

// release records that goproxy is done with the tunnel and releases
// serveConn to relay it.
func (c *servedConn) release() {
	c.released.Store(true)
	c.finish()
}

// Context keys of the values that the CONNECT path carries from the
// handler to ConnectDialWithReq and ConnectionErrHandler.
type (
	httpClientKey struct{}
	httpAppKey    struct{}
)

// newHTTPFrontend builds the front end of l and starts its http.Server.
func (s *Server) newHTTPFrontend(l *policy.Listener) *httpFrontend {
	f := &httpFrontend{
		s:          s,
		l:          l,
		log:        s.cfg.Logger.With(logkey.Component, "http", logkey.Listener, l.Listen),
		ln:         newChanListener(l.Listen),
		served:     make(chan struct{}),
		clients:    make(map[net.Conn]*servedConn),
		transports: make(map[transportKey]*http.Transport),
	}

	p := goproxy.NewProxyHttpServer()
	p.Logger = goproxyLogger{f.log}
	p.Verbose = false
	// goproxy drops Accept-Encoding by default, which would change what the
	// origin sends, although the field is end to end.
	p.KeepAcceptEncoding = true
	p.NonproxyHandler = http.HandlerFunc(serveNonProxy)
	// NewProxyHttpServer takes HTTPS_PROXY for CONNECT and the other proxy
	// variables for its transport from the environment. iapd dials every
	// target itself, so none of them applies.
	p.ConnectDial = nil
	// Every request gets its own round tripper or dial function below;
	// this transport only guards against a path that would dial unbound.
	p.Tr = &http.Transport{Proxy: nil, DialContext: refuseDial}
	p.ConnectDialWithReq = f.dialConnect
	p.ConnectionErrHandler = f.writeConnectError
	p.OnRequest().HandleConnectFunc(f.handleConnect)
	p.OnRequest().DoFunc(f.handleRequest)
	f.proxy = p

	f.srv = &http.Server{
		Handler:           http.HandlerFunc(f.serveHTTP),
		ReadHeaderTimeout: s.currentLimits().HandshakeTimeout,
		IdleTimeout:       shorterTimeout(httpClientIdleTimeout, s.currentLimits().IdleTimeout),
		// http.Server reads 4 KiB past this before it gives up.
		MaxHeaderBytes: s.currentLimits().MaxHeaderBytes,
		ErrorLog:       slog.NewLogLogger(f.log.Handler(), slog.LevelWarn),
		ConnContext:    f.connContext,
		ConnState:      f.connState,
	}
	go func() {
		defer close(f.served)
		// Serve ends only when close closes the listener and the server, so
		// its error adds nothing.
		_ = f.srv.Serve(f.ln)
	}()
	return f
}

// serveConn serves one client connection until http.Server closes it, a
// CONNECT tunnel over it is set up, or the front end is closed. It reports
// whether a relay owns the connection when it returns. c should be the raw
// *net.TCPConn, because the relay copies in the kernel only between two
// TCP sockets.
func (f *httpFrontend) serveConn(c net.Conn) (relaying bool) {
	client := &servedConn{raw: c, conn: newClientConn(c), done: make(chan struct{}), calls: make(chan func())}
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return false
	}
	f.clients[client.conn] = client
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		delete(f.clients, client.conn)
		f.mu.Unlock()
	}()

	if !f.ln.push(client.conn) {
		return false
	}
	for waiting := true; waiting; {
		select {
		case <-client.done:
			waiting = false
		case call := <-client.calls:
			call()
		}
	}

	if client.tunnel.Load() {
		f.mu.Lock()
		closed := f.closed
		f.mu.Unlock()
		if !client.released.Load() || closed {
			client.up.Close()
			return false
		}
		f.s.startRelay(c, client.up)
		return true
	}
	return false
}

// close stops the http.Server, closes every client connection including
// open tunnels, and drops the idle upstream connections of all transports.
func (f *httpFrontend) close() error {
	f.mu.Lock()
	f.closed = true
	clients := make([]*servedConn, 0, len(f.clients))
	for _, c := range f.clients {
		clients = append(clients, c)
	}
	f.mu.Unlock()

	_ = f.ln.Close()
	err := f.srv.Close()
	// http.Server does not know hijacked connections, so they are closed
	// here. Tunnels that iapd relays end when the server closes their
	// upstreams.
	for _, c := range clients {
		_ = c.raw.Close()
		c.finish()
	}
	<-f.served

	f.mu.Lock()
	for _, t := range f.transports {
		t.CloseIdleConnections()
	}
	f.mu.Unlock()
	return err
}

func (f *httpFrontend) client(c net.Conn) *servedConn {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.clients[c]
}

func (f *httpFrontend) connContext(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, httpClientKey{}, f.client(c))
}

// connState tracks when a connection leaves http.Server: StateClosed ends
// it, and StateHijacked hands it to goproxy, whose CONNECT path ends it.
func (f *httpFrontend) connState(c net.Conn, state http.ConnState) {
	client := f.client(c)
	if client == nil {
		return
	}
	switch state {
	case http.StateHijacked:
		client.hijacked.Store(true)
	case http.StateClosed:
		client.finish()
	}
}

func clientFromContext(ctx context.Context) *servedConn {
	c, _ := ctx.Value(httpClientKey{}).(*servedConn)
	return c
}

func appFromContext(ctx context.Context) (*policy.App, string) {
	c, _ := ctx.Value(httpAppKey{}).(httpClient)
	return c.app, c.choice
}

// serveHTTP runs goproxy, takes over a connection whose origin switched
// protocols, and ends a hijacked connection that no tunnel took over:
// goproxy has already written a rejection or a dial error to it.
func (f *httpFrontend) serveHTTP(w http.ResponseWriter, r *http.Request) {
	defer f.s.recoverHandler()
	if r.ProtoMajor == 1 && r.ProtoMinor > 1 {
		// goproxy answers CONNECT in the request's version, but a server
		// answers in the highest minor version it implements (RFC 9110
		// section 2.5), which is HTTP/1.1 here.
		r = r.WithContext(r.Context())
		r.Proto, r.ProtoMinor = "HTTP/1.1", 1
	}
	client := clientFromContext(r.Context())
	if client != nil && r.Method != http.MethodConnect && upgradeProtocols(r) != "" {
		defer func() {
			// Reached only when goproxy panicked after the 101.
			if u := client.upgraded; u != nil {
				client.upgraded = nil
				u.up.Close()
			}
		}()
		f.proxy.ServeHTTP(upgradeWriter{w}, r)
		if u := client.upgraded; u != nil {
			client.upgraded = nil
			f.finishUpgrade(w, client, u)
		}
	} else if r.Method != http.MethodConnect {
		f.proxy.ServeHTTP(&untypedWriter{ResponseWriter: w}, r)
	} else {
		f.proxy.ServeHTTP(w, r)
	}

	if client != nil && client.hijacked.Load() && !client.tunnel.Load() {
		_ = client.conn.Close()
		client.finish()
	}
}

// serveNonProxy responds to an origin-form request (GET /path), which a client
// sends when it takes iapd for a web server.
func serveNonProxy(w http.ResponseWriter, r *http.Request) {
	http.Error(w, "iapd is a proxy: send requests in absolute form (GET http://host/path) or use CONNECT host:port", http.StatusBadRequest)
}

// identify returns the app of a request and the access point or
// destination the client chose with its user name (see
// policy.Listener.Identify), or the response to send instead: 407 when
// credentials are missing, malformed or wrong.
func (f *httpFrontend) identify(r *http.Request) (*policy.App, string, *http.Response) {
	header := r.Header.Get("Proxy-Authorization")
	user, password, ok := parseBasicCredentials(header)
	if !f.l.HasUsers() {
		// A listener of one app ignores credentials, apart from a choice.
		app, choice, _ := f.l.Identify(user, policy.Password(password), ok)
		return app, choice, nil
	}
	if header == "" {
		// Browsers send their first request without credentials and retry
		// after the 407, so a missing header is routine and not a failure.
		f.log.Debug("proxy authentication required", logkey.Client, r.RemoteAddr, logkey.Target, r.Host)
		return nil, "", authRequiredResponse(r)
	}

	s, client := f.s, clientAddr(r)
	if ok, delayed := s.auth.wait(r.Context(), client, user, time.Now().Add(s.currentLimits().HandshakeTimeout)); !ok {
		s.stats.authDelayed.Add(1)
		f.log.Info("proxy authentication rejected unchecked: too many failures from this address", logkey.Client, r.RemoteAddr, "user", user, logkey.Target, r.Host)
		return nil, "", authRequiredResponse(r)
	} else if delayed {
		s.stats.authDelayed.Add(1)
	}

	var app *policy.App
	var choice string
	var err error
	if ok {
		app, choice, err = f.l.Identify(user, policy.Password(password), true)
	} else {
		err = errMalformedCredentials
	}
	if err == nil {
		s.auth.succeeded(client, user)
		return app, choice, nil
	}
	s.stats.authFailures.Add(1)
	s.auth.failed(client, user)

	f.log.Info("proxy authentication failed",
		logkey.Client, r.RemoteAddr, "user", user, logkey.Target, r.Host, logkey.Err, err)
	return nil, "", authRequiredResponse(r)
}

// httpClient is the identified client of one request: its app and its
// choice of access point or destination, "" for none.
type httpClient struct {
	app    *policy.App
	choice string
}

// clientAddr returns the client's address of a request, or the zero Addr.
func clientAddr(r *http.Request) netip.Addr {
	ap, _ := netip.ParseAddrPort(r.RemoteAddr)
	return ap.Addr()
}

// handleConnect identifies the app of a CONNECT request and stores it in the
// request's context, where dialConnect finds it.
func (f *httpFrontend) handleConnect(host string, ctx *goproxy.ProxyCtx) (*goproxy.ConnectAction, string) {
	r := ctx.Req
	app, choice, resp := f.identify(r)
	if resp != nil {
		ctx.Resp = resp
		return &goproxy.ConnectAction{Action: goproxy.ConnectReject}, host
	}

	// goproxy would append ":80" to a target without a port; a CONNECT
	// without one is a client error (RFC 9110 section 9.3.6).
	if _, port, err := net.SplitHostPort(host); err != nil || port == "" {
		ctx.Resp = errorResponse(r, http.StatusBadRequest,
			fmt.Sprintf("iapd: CONNECT target %q is not host:port\n", host))
		return &goproxy.ConnectAction{Action: goproxy.ConnectReject}, host
	}

	ctx.Req = r.WithContext(context.WithValue(r.Context(), httpAppKey{}, httpClient{app: app, choice: choice}))
	return &goproxy.ConnectAction{Action: goproxy.ConnectAccept}, host
}

// dialConnect dials the target of a CONNECT request for the app that
// handleConnect identified.
func (f *httpFrontend) dialConnect(r *http.Request, _, target string) (net.Conn, error) {
	app, choice := appFromContext(r.Context())
	if app == nil {
		// handleConnect stores the app for every request that it accepts.
		panic("proxy: httpFrontend.dialConnect: CONNECT request without an app")
	}

	client := clientFromContext(r.Context())
	var (
		up  *upstream
		err error
	)
	dial := func() {
		ctx, cancel := f.s.dialContext(r.Context())
		defer cancel()
		up, err = f.s.dial(ctx, app, choice, f.l, target)
	}
	if client != nil {
		client.run(dial)
	} else {
		dial()
	}
	if err != nil {
		f.log.Info("connect failed", logkey.App, app.Name, logkey.Target, target,
			logkey.Client, r.RemoteAddr, logkey.Err, err)
		return nil, err
	}

	if client == nil {
		// Without the client's state the tunnel cannot be handed over;
		// goproxy relays it through the upstream's own methods.
		return up, nil
	}
	client.up = up
	client.tunnel.Store(true)
	client.conn.handOff()
	return &handoffUpstream{upstream: up, released: client.release}, nil
}

// writeConnectError responds to a CONNECT whose dial failed. goproxy also
// calls it when a relay that could not half-close fails mid-stream. Nothing
// may be written into an open tunnel, so in that case it only logs.
func (f *httpFrontend) writeConnectError(w io.Writer, ctx *goproxy.ProxyCtx, err error) {
	client := clientFromContext(ctx.Req.Context())
	if client != nil && client.tunnel.Load() {
		f.log.Debug("tunnel relay failed", logkey.Target, ctx.Req.Host, logkey.Err, err)
		return
	}

	resp := errorResponse(ctx.Req, errorStatus(err), errorBody(err))
	if werr := resp.Write(w); werr != nil {
		f.log.Debug("writing CONNECT error response", logkey.Target, ctx.Req.Host, logkey.Err, werr)
	}
}

// goproxyLogger routes goproxy's own messages to slog at debug level: they
// repeat what iapd logs itself, in goproxy's words.
type goproxyLogger struct{ log *slog.Logger }

func (l goproxyLogger) Printf(format string, v ...any) {
	l.log.Debug("goproxy: " + strings.TrimSpace(fmt.Sprintf(format, v...)))
}

// chanListener is a net.Listener whose connections come from serveConn
// instead of a socket, so that core's own accept loop stays in charge.
type chanListener struct {
	addr      chanAddr
	conns     chan net.Conn
	closed    chan struct{}
	closeOnce sync.Once
}

func newChanListener(addr string) *chanListener {
	return &chanListener{addr: chanAddr(addr), conns: make(chan net.Conn), closed: make(chan struct{})}
}

// push hands c to Accept and reports whether it was taken before the
// listener closed.
func (ln *chanListener) push(c net.Conn) bool {
	select {
	case ln.conns <- c:
		return true
	case <-ln.closed:
		return false
	}
}

func (ln *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-ln.conns:
		return c, nil
	case <-ln.closed:
		return nil, net.ErrClosed
	}
}

func (ln *chanListener) Close() error {
	ln.closeOnce.Do(func() { close(ln.closed) })
	return nil
}

func (ln *chanListener) Addr() net.Addr { return ln.addr }

// chanAddr is the listen address from the policy, as written there.
type chanAddr string

func (a chanAddr) Network() string { return "tcp" }
func (a chanAddr) String() string  { return string(a) }
