package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/elazarl/goproxy"

	"iapd/internal/logkey"
	"iapd/policy"
)

// errDirectDial means goproxy reached for its own transport, which would
// dial out of no particular access point.
var errDirectDial = errors.New("proxy: dial without an access point")

const (
	// Limits of the pooled upstream connections of absolute-form requests.
	httpUpstreamIdleTimeout  = 90 * time.Second
	httpUpstreamIdlePerHost  = 8
	httpUpstreamTLSHandshake = 10 * time.Second
)

// transportKey selects the http.Transport of one app on one access point.
// http.Transport pools connections by target alone, so a transport must
// never be shared across access points. Keying by app as well keeps each
// pooled connection counted against the app that it serves.
type transportKey struct {
	app *policy.App
	ap  *policy.AccessPoint
}

// dialParamsKey carries a dialParams from roundTrip to dialPlain through
// the request's context, which http.Transport passes on to its dials.
type dialParamsKey struct{}

// dialParams holds the details of a request that dialPlain needs when it
// dials for it.
type dialParams struct {
	deadline    time.Time           // of this access point's attempt; zero for none
	destination *policy.Destination // whose plan chose the access point
	conn        *preDialed          // a connection a race made already; nil for none
}

// preDialed is a connection that a race made for a request before the
// request reached its transport, with its hold on the caps and the
// connection it displaces. The transport's dial takes it once.
type preDialed struct {
	mu     sync.Mutex // protects the fields below
	conn   net.Conn   // nil once taken or closed
	claim  claim
	victim *upstream // to close once the connection is used; nil for none
}

// take returns the connection, its claim and its victim, and leaves
// nothing behind, or returns a nil connection.
func (p *preDialed) take() (net.Conn, claim, *upstream) {
	p.mu.Lock()
	defer p.mu.Unlock()
	c, cl, victim := p.conn, p.claim, p.victim
	p.conn, p.claim, p.victim = nil, claim{}, nil
	return c, cl, victim
}

// handleRequest identifies the app of an absolute-form request, strips the
// hop-by-hop headers and sets the round tripper that dials for that app:
// roundTripUpgrade for a request that requests a protocol upgrade,
// roundTrip for the others.
func (f *httpFrontend) handleRequest(r *http.Request, ctx *goproxy.ProxyCtx) (*http.Request, *http.Response) {
	app, choice, resp := f.identify(r)
	if resp != nil {
		return r, resp
	}
	if r.URL.Scheme != "http" && r.URL.Scheme != "https" {
		body := fmt.Sprintf("iapd: scheme %q is not supported: request http:// URLs or use CONNECT\n", r.URL.Scheme)
		return r, errorResponse(r, http.StatusBadRequest, body)
	}

	// goproxy strips only some proxy headers and keeps the fields that
	// Connection names; removeHopByHop takes them all. An upgrade request
	// gets its Upgrade field back in roundTripUpgrade.
	protocols := upgradeProtocols(r)
	removeHopByHop(r.Header)
	keepUserAgent(r.Header)
	if client := clientFromContext(r.Context()); client != nil && protocols != "" {
		ctx.RoundTripper = goproxy.RoundTripperFunc(func(req *http.Request, _ *goproxy.ProxyCtx) (*http.Response, error) {
			return f.roundTripUpgrade(req, client, app, choice, protocols), nil
		})
		return r, nil
	}
	ctx.RoundTripper = goproxy.RoundTripperFunc(func(req *http.Request, _ *goproxy.ProxyCtx) (*http.Response, error) {
		return f.roundTrip(req, app, choice), nil
	})
	return r, nil
}

// roundTrip sends req for app through the access points of its plan in
// order. It moves to the next access point only when dialling failed, so
// that no request is sent twice, and it always returns a response: the
// upstream's, or an error response for the client.
func (f *httpFrontend) roundTrip(req *http.Request, app *policy.App, choice string) *http.Response {
	target := requestTarget(req.URL)
	plan := policy.NewOverridePlan(app, target, choice, f.s.cfg.Network.Conditions())
	if err := plan.Err(); err != nil {
		de := &DialError{Op: "select", App: app.Name, Destination: plan.DestinationName(), Target: target, Err: err}
		f.s.observeDial(app, "", target, 0, de)
		f.log.Info("request failed", logkey.App, app.Name, logkey.Target, target, logkey.Err, de)
		return errorResponse(req, errorStatus(de), errorBody(de))
	}
	if host, _, err := splitTarget(target); err == nil {
		if addr, err := netip.ParseAddr(host); err == nil && !app.AllowLocalTargets && f.s.isLocalTarget(addr) {
			de := &DialError{Op: "connect", App: app.Name, Destination: plan.DestinationName(), Target: target, Err: localTargetError(app, host, nil)}
			f.log.Info("request failed", logkey.App, app.Name, logkey.Target, target, logkey.Err, de)
			return errorResponse(req, errorStatus(de), errorBody(de))
		}
	}
	if plan.Destination.Select == policy.SelectRace {
		return f.roundTripRace(req, app, plan, target)
	}

	var body *retryableBody
	if req.Body != nil && req.Body != http.NoBody {
		body = &retryableBody{ReadCloser: req.Body}
	}

	deadline := time.Now().Add(f.s.currentLimits().DialTimeout)
	var errs []error
	for i, ap := range plan.Candidates {
		// Each access point gets a share of the dial time left, so that one
		// that drops packets leaves time for the next.
		params := dialParams{deadline: attemptDeadline(deadline, len(plan.Candidates)-i), destination: plan.Destination}
		out := outgoing(req, params)
		if body != nil {
			out.Body = body
		}

		resp, err := f.transport(app, ap).RoundTrip(out)
		if err == nil {
			f.logServed(req, app, ap, target, resp)
			return upstreamResponse(resp)
		}
		// dialAccessPoint leaves the app and the destination empty.
		var de *DialError
		if errors.As(err, &de) {
			de.App = app.Name
			de.Destination = plan.DestinationName()
		}
		errs = append(errs, err)

		var df *dialFailure
		if !errors.As(err, &df) || (body != nil && body.started.Load()) || i == len(plan.Candidates)-1 {
			break
		}
		f.log.Info("dial failed, trying next access point", logkey.App, app.Name, logkey.Target, target,
			logkey.AccessPoint, ap.Name, logkey.Err, err)
	}

	// As in a failover dial, the client gets the first access point's error
	// and the log gets them all.
	f.log.Info("request failed", logkey.App, app.Name, logkey.Target, target, logkey.Err, errors.Join(errs...))
	return errorResponse(req, errorStatus(errs[0]), errorBody(errs[0]))
}

// logServed logs, at debug, the access point that served a plain request.
// Plain requests share pooled upstream connections, whose close line can
// stand for many requests, so each request gets a line of its own.
func (f *httpFrontend) logServed(req *http.Request, app *policy.App, ap *policy.AccessPoint, target string, resp *http.Response) {
	if f.log.Enabled(req.Context(), slog.LevelDebug) {
		f.log.Debug("request served", logkey.App, app.Name, logkey.AccessPoint, ap.Name,
			logkey.Target, target, "method", req.Method, "status", resp.StatusCode)
	}
}

// roundTripRace sends req for app through the access point that wins a race
// of plan's candidates. The race's connection carries the request, unless
// the transport has an idle connection of its own to the target.
func (f *httpFrontend) roundTripRace(req *http.Request, app *policy.App, plan policy.Plan, target string) *http.Response {
	ctx, cancel := f.s.dialContext(req.Context())
	defer cancel()
	host, port, err := splitTarget(target)
	var c net.Conn
	var ap *policy.AccessPoint
	var derr *DialError
	var cl claim
	gate := newCapGate(f.s, app, target)
	if err != nil {
		derr = &DialError{Op: "connect", Target: target, Err: err}
	} else if cl, err = f.claimApp(app, target); err != nil {
		errors.As(err, &derr)
	} else if c, ap, derr = f.s.dialRace(ctx, plan, host, port, target, gate); derr != nil {
		f.s.table.release(cl)
	}
	if derr != nil {
		derr.App = app.Name
		derr.Destination = plan.Destination.Name
		f.log.Info("request failed", logkey.App, app.Name, logkey.Target, target, logkey.Err, derr)
		return errorResponse(req, errorStatus(derr), errorBody(derr))
	}

	pre := &preDialed{conn: c, claim: cl}
	pre.claim.accessPoint, pre.victim = gate.won(ap)
	defer func() {
		// The transport used a pooled connection of its own instead.
		if c, cl, victim := pre.take(); c != nil {
			c.Close()
			f.s.table.releaseAccessPoint(cl.accessPoint, victim)
			cl.accessPoint = ""
			f.s.table.release(cl)
		}
	}()
	resp, err := f.transport(app, ap).RoundTrip(outgoing(req, dialParams{destination: plan.Destination, conn: pre}))
	if err != nil {
		var de *DialError
		if errors.As(err, &de) {
			de.App = app.Name
			de.Destination = plan.Destination.Name
		}
		f.log.Info("request failed", logkey.App, app.Name, logkey.Target, target, logkey.AccessPoint, ap.Name, logkey.Err, err)
		return errorResponse(req, errorStatus(err), errorBody(err))
	}
	f.logServed(req, app, ap, target, resp)
	return upstreamResponse(resp)
}

// outgoing returns the request to send upstream, carrying params to the
// transport's dial.
func outgoing(req *http.Request, params dialParams) *http.Request {
	out := req.WithContext(context.WithValue(req.Context(), dialParamsKey{}, params))
	// Connection: close from the client ends the client's connection, not
	// the pooled upstream one.
	out.Close = false
	return out
}

// upstreamResponse prepares an upstream response for the client.
func upstreamResponse(resp *http.Response) *http.Response {
	removeHopByHop(resp.Header)
	if resp.ContentLength < 0 {
		// goproxy flushes each piece of the body to the client only when
		// the header says chunked; without that, a streamed response
		// waits in http.Server's buffer. http.Server turns the field into
		// its own framing for the client.
		resp.Header.Set("Transfer-Encoding", "chunked")
	}
	return resp
}

// transport returns the transport of app on ap, creating it on first use.
func (f *httpFrontend) transport(app *policy.App, ap *policy.AccessPoint) *http.Transport {
	key := transportKey{app: app, ap: ap}
	f.mu.Lock()
	defer f.mu.Unlock()
	if t, ok := f.transports[key]; ok {
		return t
	}
	t := &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return f.dialPlain(ctx, app, ap, addr)
		},
		DisableCompression:  true,
		IdleConnTimeout:     shorterTimeout(httpUpstreamIdleTimeout, f.s.currentLimits().IdleTimeout),
		MaxIdleConnsPerHost: httpUpstreamIdlePerHost,
		TLSHandshakeTimeout: httpUpstreamTLSHandshake,
	}
	if gw := ap.Proxy; gw != nil && gw.Protocol == policy.ProxyHTTP {
		// An HTTP gateway gets requests in absolute form, as any client of
		// an HTTP proxy sends them: many gateways allow CONNECT to port 443
		// only. The transport adds Proxy-Authorization from the URL.
		t.Proxy = http.ProxyURL(gw.URL())
	}
	f.transports[key] = t
	return t
}

// dialPlain dials addr through ap for a pooled connection, or takes the
// one a race made, and registers it in the connection table. Its errors
// are *dialFailure, so that roundTrip can tell that nothing of the request
// was sent.
func (f *httpFrontend) dialPlain(ctx context.Context, app *policy.App, ap *policy.AccessPoint, addr string) (net.Conn, error) {
	params, _ := ctx.Value(dialParamsKey{}).(dialParams)
	if params.conn != nil {
		if c, cl, victim := params.conn.take(); c != nil {
			if victim != nil {
				f.s.displace(victim, app)
			}
			return f.s.track(c, app, params.destination, f.l, addr, ap, cl), nil
		}
	}

	ctx, cancel := f.s.dialContext(ctx)
	defer cancel()
	if !params.deadline.IsZero() {
		var cancelShare context.CancelFunc
		ctx, cancelShare = context.WithDeadline(ctx, params.deadline)
		defer cancelShare()
	}

	cl, victim, err := f.claim(app, ap, addr)
	if err != nil {
		return nil, &dialFailure{err: err}
	}
	started := time.Now()
	var c net.Conn
	if gw := ap.Proxy; gw != nil && gw.Protocol == policy.ProxyHTTP {
		// The transport dials the gateway itself (see transport).
		c, err = f.s.gatewayTransportDial(ctx, ap, addr)
	} else {
		c, err = f.s.dialAccessPoint(ctx, app, ap, addr)
	}
	var derr *DialError
	errors.As(err, &derr)
	f.s.observeDial(app, ap.Name, addr, time.Since(started), derr)
	if err != nil {
		f.s.table.releaseAccessPoint(cl.accessPoint, victim)
		cl.accessPoint = ""
		f.s.table.release(cl)
		return nil, &dialFailure{err: err}
	}
	if victim != nil {
		f.s.displace(victim, app)
	}
	return f.s.track(c, app, params.destination, f.l, addr, ap, cl), nil
}

// claimApp takes one connection of app's cap for a pooled connection.
// When app is at its cap, its own idle pooled connections go first, since
// they may be all that holds it there.
func (f *httpFrontend) claimApp(app *policy.App, target string) (claim, error) {
	cl, ok := f.s.table.claimApp(app)
	if !ok {
		f.closeIdleConnections()
		if cl, ok = f.s.table.claimApp(app); !ok {
			err := fmt.Errorf("%w (max_connections %d)", ErrAppLimit, app.MaxConnections)
			return claim{}, &DialError{Op: "admit", App: app.Name, Destination: app.Destination.Name, Target: target, Err: err}
		}
	}
	return cl, nil
}

// claim takes one connection of app's and ap's caps for a pooled
// connection, with the connection to displace when ap is full, as
// claimAccessPoint does.
func (f *httpFrontend) claim(app *policy.App, ap *policy.AccessPoint, target string) (claim, *upstream, error) {
	cl, err := f.claimApp(app, target)
	if err != nil {
		return claim{}, nil, err
	}
	victim, counted, ok := f.s.table.claimAccessPoint(ap, app.Priority)
	if !ok {
		f.s.table.release(cl)
		err := fmt.Errorf("%w (max_connections %d)", ErrAccessPointFull, ap.MaxConnections)
		return claim{}, nil, &DialError{Op: "admit", AccessPoint: ap.Name, Interface: f.s.cfg.Network.Interface(ap), Target: target, Err: err}
	}
	if counted {
		cl.accessPoint = ap.Name
	}
	return cl, victim, nil
}

// closeIdleConnections closes the idle pooled upstream connections of
// every transport of f.
func (f *httpFrontend) closeIdleConnections() {
	f.mu.Lock()
	transports := make([]*http.Transport, 0, len(f.transports))
	for _, t := range f.transports {
		transports = append(transports, t)
	}
	f.mu.Unlock()
	for _, t := range transports {
		t.CloseIdleConnections()
	}
}

// dialFailure marks an error that happened while dialling, before any byte
// of the request was written.
type dialFailure struct{ err error }

func (e *dialFailure) Error() string { return e.err.Error() }
func (e *dialFailure) Unwrap() error { return e.err }

// retryableBody lets a request body survive a failed attempt: http.Transport
// closes the body when its dial fails, which would leave nothing for the
// next access point. started reports whether any attempt began reading it;
// http.Server closes the real body when the handler returns.
type retryableBody struct {
	io.ReadCloser
	started atomic.Bool
}

func (b *retryableBody) Read(p []byte) (int, error) {
	b.started.Store(true)
	return b.ReadCloser.Read(p)
}

func (b *retryableBody) Close() error { return nil }

// attemptDeadline returns the dial deadline of one of left attempts: an even
// share of the time until deadline, but at least minAttemptTime of it.
func attemptDeadline(deadline time.Time, left int) time.Time {
	remaining := time.Until(deadline)
	if left <= 1 || remaining <= 0 {
		return deadline
	}
	share := max(remaining/time.Duration(left), min(minAttemptTime, remaining))
	return time.Now().Add(share)
}

// requestTarget returns host:port of an absolute-form request URL, with
// the scheme's default port when the URL has none.
func requestTarget(u *url.URL) string {
	port := u.Port()
	if port == "" {
		port = "80"
		if u.Scheme == "https" {
			port = "443"
		}
	}
	return net.JoinHostPort(u.Hostname(), port)
}

func refuseDial(context.Context, string, string) (net.Conn, error) {
	return nil, errDirectDial
}

// shorterTimeout returns d, or limit when that is set and shorter.
func shorterTimeout(d, limit time.Duration) time.Duration {
	if limit > 0 && limit < d {
		return limit
	}
	return d
}
