package proxy

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/textproto"
	"os"
	"strconv"
	"strings"

	"github.com/elazarl/goproxy"

	"iapd/dns"
	"iapd/policy"
)

// errMalformedCredentials means a Proxy-Authorization header that is not
// "Basic base64(user:password)".
var errMalformedCredentials = errors.New("proxy: malformed Proxy-Authorization header")

// hopByHopHeaders are the fields that belong to one connection and never
// pass a proxy (RFC 9110 section 7.6.1), plus the proxy's own
// authentication and the nonstandard Proxy-Connection that curl sends.
var hopByHopHeaders = []string{
	"Connection",
	"Keep-Alive",
	"Proxy-Authenticate",
	"Proxy-Authorization",
	"Proxy-Connection",
	"Te",
	"Trailer",
	"Transfer-Encoding",
	"Upgrade",
}

// removeHopByHop deletes from h the hop-by-hop fields and every field that
// its Connection header names. A protocol upgrade puts its Upgrade and
// Connection fields back (see roundTripUpgrade).
func removeHopByHop(h http.Header) {
	for _, v := range h.Values("Connection") {
		for name := range strings.SplitSeq(v, ",") {
			if name = textproto.TrimString(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, name := range hopByHopHeaders {
		h.Del(name)
	}
}

// parseBasicCredentials splits a Proxy-Authorization value of the Basic
// scheme (RFC 7617), whose name is case-insensitive, into user and password.
func parseBasicCredentials(header string) (user, password string, ok bool) {
	scheme, encoded, found := strings.Cut(strings.TrimSpace(header), " ")
	if !found || !strings.EqualFold(scheme, "Basic") {
		return "", "", false
	}
	decoded, err := base64.StdEncoding.DecodeString(strings.TrimSpace(encoded))
	if err != nil {
		return "", "", false
	}
	return strings.Cut(string(decoded), ":")
}

// authRequiredResponse is the 407 that requests for Basic
// credentials. A plain request keeps its connection so that the client can
// retry on it; goproxy closes the connection of a rejected CONNECT anyway.
func authRequiredResponse(r *http.Request) *http.Response {
	body := "iapd: proxy authentication required: send the user name and password of an app on this listener\n"
	resp := textResponse(r, http.StatusProxyAuthRequired, body)
	resp.Header.Set("Proxy-Authenticate", `Basic realm="iapd"`)
	if r.Method == http.MethodConnect {
		resp.Header.Set("Connection", "close")
		resp.Close = true
	}
	return resp
}

// errorResponse is a plain-text response that closes the client connection.
func errorResponse(r *http.Request, status int, body string) *http.Response {
	resp := textResponse(r, status, body)
	resp.Header.Set("Connection", "close")
	resp.Close = true
	return resp
}

func textResponse(r *http.Request, status int, body string) *http.Response {
	resp := goproxy.NewResponse(r, "text/plain; charset=utf-8", status, body)
	// NewResponse copies the request's transfer encoding; the body here
	// has a known length.
	resp.TransferEncoding = nil
	resp.Header.Set("Content-Length", strconv.Itoa(len(body)))
	return resp
}

// errorStatus maps a dial or round-trip error to the status the client
// gets. A target that is not host:port or not a valid name gets 400. A
// connection the policy refuses, or a local target the app may not reach,
// gets 403, and no usable access point or a reached connection cap 503. A
// timeout gets 504, and the rest 502.
func errorStatus(err error) int {
	switch {
	case errors.Is(err, policy.ErrNotAllowed):
		return http.StatusForbidden
	case errors.Is(err, ErrInvalidTarget), errors.Is(err, dns.ErrInvalidName):
		return http.StatusBadRequest
	case errors.Is(err, ErrLocalTarget):
		return http.StatusForbidden
	case errors.Is(err, policy.ErrNoUsableAccessPoint), errors.Is(err, ErrAppLimit), errors.Is(err, ErrAccessPointFull):
		return http.StatusServiceUnavailable
	case isTimeout(err):
		return http.StatusGatewayTimeout
	}
	return http.StatusBadGateway
}

func isTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// errorBody is the text of an error response: the error, and the
// destination that was tried when the error text does not name it yet.
func errorBody(err error) string {
	text := err.Error()
	var de *DialError
	if errors.As(err, &de) && de.Destination != "" && !strings.Contains(text, strconv.Quote(de.Destination)) {
		text = fmt.Sprintf("destination %q: %s", de.Destination, text)
	}
	return "iapd: " + text + "\n"
}

// keepUserAgent keeps net/http from sending its own User-Agent with a
// request that had none. A proxy passes the client's request on as it
// came, and a User-Agent of its own would also tell the origin that a
// proxy is in the path. net/http sends no User-Agent when the field is
// present and empty.
func keepUserAgent(h http.Header) {
	if _, ok := h["User-Agent"]; !ok {
		h["User-Agent"] = []string{""}
	}
}

// untypedWriter is the response writer of a plain proxy request. It keeps
// http.Server from guessing a Content-Type from the body of a response
// whose origin sent none, so that the client gets the response as the
// origin sent it and decides for itself. http.Server still adds a Date to
// a response without one, which records when the proxy received it.
type untypedWriter struct {
	http.ResponseWriter
	wroteHeader bool
}

func (w *untypedWriter) WriteHeader(code int) {
	if !w.wroteHeader {
		w.wroteHeader = true
		if h := w.Header(); h != nil {
			if _, ok := h["Content-Type"]; !ok {
				h["Content-Type"] = nil // present and empty: no sniffing
			}
		}
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *untypedWriter) Write(p []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(p)
}

// Flush sends what is buffered, for a response that streams.
func (w *untypedWriter) Flush() {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *untypedWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
