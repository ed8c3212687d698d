package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"strings"
	"time"

	"iapd/internal/logkey"
	"iapd/policy"
)

// errUpgradeRelayed is the error that the response writer of an upgrade
// request returns when goproxy tries to hijack the connection, because
// iapd relays an upgraded connection itself.
var errUpgradeRelayed = errors.New("proxy: upgraded connection is relayed by iapd")

// A protocol upgrade on a plain request (RFC 9110 section 7.8), such as a
// WebSocket handshake on GET http://host/ (RFC 6455 section 4.1), takes
// this path:
//
//  1. handleRequest finds Connection: upgrade with an Upgrade field on an
//     HTTP/1.1 request for an http:// URL and sets roundTripUpgrade as
//     the round tripper instead of the pooled transport.
//  2. roundTripUpgrade dials the target through s.dial, as a CONNECT
//     does, writes the request with its Upgrade field and Connection:
//     Upgrade, and reads the response.
//  3. A 101 goes back to goproxy, which writes it to the client, and the
//     upstream waits in the client's servedConn. Any other response is an
//     ordinary one, and its upstream connection closes after its body.
//  4. serveHTTP hijacks the client connection after goproxy has returned,
//     passes on the bytes that either side sent early, and hands both
//     sockets to serveConn, which relays them with startRelay.
//
// goproxy v1.9.4 relays a WebSocket on a plain request itself (http.go and
// websocket.go in its module), but only for "Upgrade: websocket", and with
// two copies of its own that stop when the first direction ends.
// upgradeWriter keeps goproxy from taking the connection, so that iapd's
// relay counts the bytes, passes half-closes on and shows the tunnel in the
// table like a CONNECT tunnel.

// upgradedUpstream is the upstream of a request whose origin switched
// protocols, waiting for serveHTTP to take over the client connection.
type upgradedUpstream struct {
	up    *upstream
	early []byte // bytes the origin sent after its 101, read along with the response
}

// upgradeProtocols returns the Upgrade field of r, its values joined, when
// r requests a protocol upgrade that iapd passes on: Connection names
// upgrade, and r is HTTP/1.1 for an http:// URL. It returns "" otherwise.
// An HTTP/1.0 request's Upgrade is ignored (RFC 9110 section 7.8), and
// wss:// goes through CONNECT.
func upgradeProtocols(r *http.Request) string {
	if !r.ProtoAtLeast(1, 1) || r.URL.Scheme != "http" || !hasToken(r.Header, "Connection", "upgrade") {
		return ""
	}
	return strings.Join(r.Header.Values("Upgrade"), ", ")
}

// hasToken reports whether a comma-separated list in the field name of h
// contains token, compared without regard to case.
func hasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for item := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(textproto.TrimString(item), token) {
				return true
			}
		}
	}
	return false
}

// roundTripUpgrade sends req, which requests a switch to protocols, for app
// over a connection of its own, and returns the response for the client:
// the origin's, or an error response. On a 101 it leaves the upstream in
// client for serveHTTP.
//
// NOTE: through an access point with an HTTP gateway the request goes
// through a CONNECT tunnel to the target, as a client's CONNECT does, not in
// absolute form like other plain requests. A gateway that allows CONNECT
// only to port 443 refuses it.
func (f *httpFrontend) roundTripUpgrade(req *http.Request, client *servedConn, app *policy.App, choice, protocols string) *http.Response {
	target := requestTarget(req.URL)
	var up *upstream
	var err error
	client.run(func() {
		ctx, cancel := f.s.dialContext(req.Context())
		defer cancel()
		up, err = f.s.dial(ctx, app, choice, f.l, target)
	})
	if err != nil {
		f.log.Info("request failed", logkey.App, app.Name, logkey.Target, target, logkey.Err, err)
		return errorResponse(req, errorStatus(err), errorBody(err))
	}

	resp, early, err := exchangeUpgrade(req, up, protocols)
	if err != nil {
		up.Close()
		err = fmt.Errorf("requesting upgrade to %q from %s: %w", protocols, target, err)
		f.log.Info("request failed", logkey.App, app.Name, logkey.Target, target,
			logkey.AccessPoint, up.info.AccessPoint, logkey.Err, err)
		return errorResponse(req, errorStatus(err), errorBody(err))
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		// The origin did not switch, so this is an ordinary response. Its
		// connection is not pooled, because the transports pool only the
		// connections they dialled.
		resp.Body = &closingBody{ReadCloser: resp.Body, up: up}
		return upstreamResponse(resp)
	}

	switched := resp.Header.Values("Upgrade")
	removeHopByHop(resp.Header)
	resp.Header["Upgrade"] = switched
	resp.Header.Set("Connection", "Upgrade")
	resp.Body = http.NoBody
	client.upgraded = &upgradedUpstream{up: up, early: early}
	f.log.Debug("protocol switched", logkey.App, app.Name, logkey.Target, target,
		logkey.AccessPoint, up.info.AccessPoint, "upgrade", strings.Join(switched, ", "))
	return resp
}

// exchangeUpgrade writes req to up with protocols in its Upgrade field and
// reads the origin's final response. For a 101 it also returns the bytes
// that the origin sent after it and that the reader took along. For another
// status the response's body reads from up. It gives up when req's context
// ends, which http.Server does when the client goes away.
func exchangeUpgrade(req *http.Request, up *upstream, protocols string) (*http.Response, []byte, error) {
	stop := context.AfterFunc(req.Context(), func() {
		// A deadline in the past wakes a blocked read or write at once.
		up.Conn.SetDeadline(time.Unix(1, 0))
	})
	resp, br, err := writeUpgradeRequest(req, up, protocols)
	if !stop() {
		return nil, nil, fmt.Errorf("client went away: %w", context.Cause(req.Context()))
	}
	if err != nil {
		return nil, nil, err
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return resp, nil, nil
	}
	if len(resp.Header.Values("Upgrade")) == 0 {
		// RFC 9110 section 7.8: a 101 names the protocol switched to.
		return nil, nil, errors.New("origin sent 101 Switching Protocols without an Upgrade field")
	}
	early, _ := br.Peek(br.Buffered())
	return resp, early, nil
}

// writeUpgradeRequest writes req to up in origin form and reads responses
// until one is final or a 101; other 1xx responses are dropped.
func writeUpgradeRequest(req *http.Request, up *upstream, protocols string) (*http.Response, *bufio.Reader, error) {
	out := req.Clone(req.Context())
	out.Header.Set("Connection", "Upgrade")
	out.Header.Set("Upgrade", protocols)
	out.Close = false
	if err := out.Write(up); err != nil {
		return nil, nil, fmt.Errorf("writing request: %w", err)
	}

	br := bufio.NewReader(up)
	for {
		resp, err := http.ReadResponse(br, out)
		if err != nil {
			return nil, nil, fmt.Errorf("reading response: %w", err)
		}
		if resp.StatusCode >= 200 || resp.StatusCode == http.StatusSwitchingProtocols {
			return resp, br, nil
		}
	}
}

// closingBody is the body of a response to an upgrade request that the
// origin refused. Closing it closes the upstream connection as well.
type closingBody struct {
	io.ReadCloser
	up *upstream
}

func (b *closingBody) Close() error {
	err := b.ReadCloser.Close()
	b.up.Close()
	return err
}

// finishUpgrade takes over the client connection of w after goproxy has
// written the 101 to it, passes on the bytes that either side sent before
// the switch, and releases serveConn to relay the connection with u.
func (f *httpFrontend) finishUpgrade(w http.ResponseWriter, client *servedConn, u *upgradedUpstream) {
	// Hijack sends the 101 that http.Server still buffers.
	c, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		u.up.Close()
		f.log.Info("hijacking upgraded connection failed", logkey.Target, u.up.info.Target, logkey.Err, err)
		return
	}

	// RFC 6455 section 4.1 has a client wait for the 101 before it sends
	// more, but a client that does not has its first bytes in
	// http.Server's buffer.
	if err := passEarlyBytes(c, u, brw.Reader); err != nil {
		u.up.Close()
		c.Close()
		f.log.Debug("passing early bytes of upgraded connection failed", logkey.Target, u.up.info.Target, logkey.Err, err)
		return
	}
	client.up = u.up
	client.tunnel.Store(true)
	client.release()
}

// passEarlyBytes writes what the client sent after its request to the
// upstream and what the origin sent after its 101 to the client c.
func passEarlyBytes(c net.Conn, u *upgradedUpstream, clientBuffer *bufio.Reader) error {
	if n := clientBuffer.Buffered(); n > 0 {
		early, _ := clientBuffer.Peek(n)
		if _, err := u.up.Write(early); err != nil {
			return fmt.Errorf("writing to upstream: %w", err)
		}
	}
	if len(u.early) > 0 {
		// upstream.Read counted these bytes already.
		if _, err := c.Write(u.early); err != nil {
			return fmt.Errorf("writing to client: %w", err)
		}
	}
	return nil
}

// upgradeWriter is the response writer goproxy gets for an upgrade
// request. It refuses goproxy's hijack, so that goproxy only writes the
// 101 and iapd takes the connection over afterwards.
type upgradeWriter struct {
	http.ResponseWriter
}

func (w upgradeWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return nil, nil, errUpgradeRelayed
}

// Flush sends what is buffered, for a refused upgrade whose response streams.
func (w upgradeWriter) Flush() {
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

func (w upgradeWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
