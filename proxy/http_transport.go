package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
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
// request reached its transport. The transport's dial takes it once.
type preDialed struct {
	mu   sync.Mutex // protects conn
	conn net.Conn   // nil once taken or closed
}

// take returns the connection and leaves nothing behind, or returns nil.
func (p *preDialed) take() net.Conn {
	p.mu.Lock()
	defer p.mu.Unlock()
	c := p.conn
	p.conn = nil
	return c
}

// handleRequest identifies the app of an absolute-form request, strips the
// hop-by-hop headers and sets the round tripper that dials for that app.
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
	// Connection names; removeHopByHop takes them all.
	removeHopByHop(r.Header)
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
	if plan.Destination.Select == policy.SelectRace {
		return f.roundTripRace(req, app, plan, target)
	}

	var body *retryableBody
	if req.Body != nil && req.Body != http.NoBody {
		body = &retryableBody{ReadCloser: req.Body}
	}

	deadline := time.Now().Add(f.s.cfg.DialTimeout)
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
	if err != nil {
		derr = &DialError{Op: "connect", Target: target, Err: err}
	} else {
		c, ap, derr = f.s.dialRace(ctx, plan, host, port, target)
	}
	if derr != nil {
		derr.App = app.Name
		derr.Destination = plan.Destination.Name
		f.log.Info("request failed", logkey.App, app.Name, logkey.Target, target, logkey.Err, derr)
		return errorResponse(req, errorStatus(derr), errorBody(derr))
	}

	pre := &preDialed{conn: c}
	defer func() {
		if c := pre.take(); c != nil {
			c.Close()
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
		IdleConnTimeout:     httpUpstreamIdleTimeout,
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
		if c := params.conn.take(); c != nil {
			return f.s.track(c, app, params.destination, f.l, addr, ap), nil
		}
	}

	ctx, cancel := f.s.dialContext(ctx)
	defer cancel()
	if !params.deadline.IsZero() {
		var cancelShare context.CancelFunc
		ctx, cancelShare = context.WithDeadline(ctx, params.deadline)
		defer cancelShare()
	}

	started := time.Now()
	var c net.Conn
	var err error
	if gw := ap.Proxy; gw != nil && gw.Protocol == policy.ProxyHTTP {
		// The transport dials the gateway itself (see transport).
		c, err = f.s.gatewayTransportDial(ctx, ap, addr)
	} else {
		c, err = f.s.dialAccessPoint(ctx, ap, addr)
	}
	var derr *DialError
	errors.As(err, &derr)
	f.s.observeDial(app, ap.Name, addr, time.Since(started), derr)
	if err != nil {
		return nil, &dialFailure{err: err}
	}
	return f.s.track(c, app, params.destination, f.l, addr, ap), nil
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
