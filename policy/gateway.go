package policy

import (
	"log/slog"
	"net"
	"net/url"
)

// ProxyProtocol is the protocol of a gateway proxy.
type ProxyProtocol uint8

// Gateway proxy protocols.
const (
	ProxySOCKS5 ProxyProtocol = iota + 1 // RFC 1928, with RFC 1929 user name and password
	ProxyHTTP                            // HTTP CONNECT (RFC 9110 section 9.3.6), with Basic credentials
)

func (p ProxyProtocol) String() string {
	switch p {
	case ProxySOCKS5:
		return "socks5"
	case ProxyHTTP:
		return "http"
	}
	return "unknown"
}

// GatewayProxy is an upstream proxy that an access point sends its
// connections through, like an enterprise gateway. Target names are passed
// to it unresolved, so the gateway's own resolver resolves them. It is
// immutable after Load; its LogValue leaves out the password.
type GatewayProxy struct {
	Protocol ProxyProtocol
	// Address is host:port. The host is an IP address, or a name that the
	// access point's own resolver resolves.
	Address string
	User    string // empty when the proxy needs no credentials

	password string
}

// Password returns the password of User, read from the environment at load.
func (g *GatewayProxy) Password() string { return g.password }

// Host returns the host part of Address.
func (g *GatewayProxy) Host() string {
	host, _, _ := net.SplitHostPort(g.Address)
	return host
}

// URL returns the proxy as a URL with its credentials, for clients such as
// http.Transport that take one. Do not log it.
func (g *GatewayProxy) URL() *url.URL {
	u := &url.URL{Scheme: g.Protocol.String(), Host: g.Address}
	if g.User != "" {
		u.User = url.UserPassword(g.User, g.password)
	}
	return u
}

// String returns the proxy as "socks5://user@host:port", without the
// password.
func (g *GatewayProxy) String() string {
	s := g.Protocol.String() + "://"
	if g.User != "" {
		s += g.User + "@"
	}
	return s + g.Address
}

// LogValue logs the proxy without its password.
func (g *GatewayProxy) LogValue() slog.Value { return slog.StringValue(g.String()) }
