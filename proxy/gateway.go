package proxy

import (
	"bufio"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"time"

	"golang.org/x/net/proxy"

	"iapd/policy"
)

// dialGateway connects to target (host:port as the client sent it) through
// ap's gateway proxy. The gateway itself is reached out of ap's interface,
// its host resolved by ap's resolver when it is a name; the target's name
// goes to the gateway unresolved, so that the gateway's own resolver, and
// no resolver of this host, learns it.
// DialGateway dials target (host:port, a name left unresolved) through
// ap's gateway proxy, out of ap's interface. Health probes use it, so that
// an access point with a gateway is usable only while the gateway answers.
func (s *Server) DialGateway(ctx context.Context, ap *policy.AccessPoint, target string) (net.Conn, error) {
	c, derr := s.dialGateway(ctx, ap, target)
	if derr != nil {
		return nil, derr
	}
	return c, nil
}

func (s *Server) dialGateway(ctx context.Context, ap *policy.AccessPoint, target string) (net.Conn, *DialError) {
	gw := ap.Proxy
	derr := &DialError{AccessPoint: ap.Name, Interface: s.cfg.Network.Interface(ap), Target: target}

	// raw is the connection to the gateway, kept so that the tunnel is
	// handed on as the bare TCP socket the relay can splice.
	var raw net.Conn
	reach := func(ctx context.Context) (net.Conn, error) {
		c, err := s.dialGatewayConn(ctx, ap)
		if err != nil {
			return nil, err
		}
		raw = c
		return c, nil
	}

	var err error
	switch gw.Protocol {
	case policy.ProxySOCKS5:
		err = socks5Connect(ctx, gw, target, reach)
	case policy.ProxyHTTP:
		err = httpConnect(ctx, gw, target, reach, &raw)
	default:
		err = fmt.Errorf("unknown gateway protocol %d", gw.Protocol)
	}
	if err != nil {
		if raw != nil {
			raw.Close()
		}
		var reachErr *gatewayReachError
		if errors.As(err, &reachErr) {
			derr.Op = reachErr.op
		} else {
			derr.Op = "connect"
		}
		derr.Err = fmt.Errorf("through gateway proxy %s: %w", gw, err)
		return nil, derr
	}
	return raw, nil
}

// gatewayReachError is a failure to reach the gateway proxy itself, before
// any byte of its protocol was sent.
type gatewayReachError struct {
	op  string // "resolve" or "connect", as in DialError
	err error
}

func (e *gatewayReachError) Error() string { return e.err.Error() }
func (e *gatewayReachError) Unwrap() error { return e.err }

// dialGatewayConn opens a TCP connection to ap's gateway proxy out of ap's
// interface.
func (s *Server) dialGatewayConn(ctx context.Context, ap *policy.AccessPoint) (net.Conn, error) {
	host, port, err := splitTarget(ap.Proxy.Address)
	if err != nil {
		return nil, &gatewayReachError{op: "connect", err: err}
	}
	c, derr := s.dialDirect(ctx, ap, host, port, nil)
	if derr != nil {
		return nil, &gatewayReachError{op: derr.Op, err: derr.Err}
	}
	return c, nil
}

// socks5Connect asks a SOCKS5 gateway for a tunnel to target, over the
// connection that reach opens.
func socks5Connect(ctx context.Context, gw *policy.GatewayProxy, target string, reach func(context.Context) (net.Conn, error)) error {
	var auth *proxy.Auth
	if gw.User != "" {
		auth = &proxy.Auth{User: gw.User, Password: gw.Password()}
	}
	d, err := proxy.SOCKS5("tcp", gw.Address, auth, contextDialerFunc(func(ctx context.Context, _, _ string) (net.Conn, error) {
		return reach(ctx)
	}))
	if err != nil {
		return err
	}
	// golang.org/x/net/proxy's dialer reads exactly the SOCKS5 reply, so
	// the raw connection that reach returned carries the tunnel as it is.
	_, err = d.(proxy.ContextDialer).DialContext(ctx, "tcp", target)
	return unwrapOpError(err)
}

// unwrapOpError drops the *net.OpError that golang.org/x/net/proxy puts
// around its errors, which repeats the addresses that DialError names
// already.
func unwrapOpError(err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "socks connect" {
		return op.Err
	}
	return err
}

type contextDialerFunc func(ctx context.Context, network, address string) (net.Conn, error)

func (f contextDialerFunc) Dial(network, address string) (net.Conn, error) {
	return f(context.Background(), network, address)
}

func (f contextDialerFunc) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return f(ctx, network, address)
}

// errGatewayStatus means an HTTP gateway answered CONNECT with a status
// other than 2xx.
var errGatewayStatus = errors.New("gateway refused CONNECT")

// httpConnect asks an HTTP gateway for a tunnel to target with CONNECT
// (RFC 9110 section 9.3.6), over the connection that reach opens. When the
// gateway sent bytes of the tunnel along with its response, *raw is
// replaced by a connection that returns them first.
func httpConnect(ctx context.Context, gw *policy.GatewayProxy, target string, reach func(context.Context) (net.Conn, error), raw *net.Conn) error {
	c, err := reach(ctx)
	if err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	if deadline, ok := ctx.Deadline(); ok {
		c.SetDeadline(deadline)
		defer c.SetDeadline(time.Time{})
	}

	req := &http.Request{
		Method: http.MethodConnect,
		URL:    &url.URL{Opaque: target},
		Host:   target,
		Header: make(http.Header),
	}
	if gw.User != "" {
		creds := base64.StdEncoding.EncodeToString([]byte(gw.User + ":" + gw.Password()))
		req.Header.Set("Proxy-Authorization", "Basic "+creds)
	}
	if err := req.Write(c); err != nil {
		return ctxOr(ctx, fmt.Errorf("sending CONNECT: %w", err))
	}

	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return ctxOr(ctx, fmt.Errorf("reading CONNECT response: %w", err))
	}
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("%w: %s", errGatewayStatus, resp.Status)
	}
	if n := br.Buffered(); n > 0 {
		early, _ := br.Peek(n)
		*raw = &prefixConn{Conn: c, prefix: append([]byte(nil), early...)}
	}
	return nil
}

// ctxOr returns the context's error when it ended, since closing the
// connection on cancellation makes the I/O error itself say little.
func ctxOr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
	return err
}

// prefixConn returns prefix before the bytes of Conn.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// gatewayTransportDial dials the HTTP gateway of ap for an http.Transport
// that sends absolute-form requests to it. addr is the gateway's address,
// which the transport takes from the proxy URL.
func (s *Server) gatewayTransportDial(ctx context.Context, ap *policy.AccessPoint, addr string) (net.Conn, error) {
	c, err := s.dialGatewayConn(ctx, ap)
	if err != nil {
		return nil, &DialError{Op: "connect", AccessPoint: ap.Name, Interface: s.cfg.Network.Interface(ap), Target: addr,
			Err: fmt.Errorf("through gateway proxy %s: %w", ap.Proxy, err)}
	}
	return c, nil
}
