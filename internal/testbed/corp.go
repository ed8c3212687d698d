package testbed

import (
	"context"
	"fmt"
	"log"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	socks5 "github.com/armon/go-socks5"
	"github.com/miekg/dns"
)

// AddSite makes u serve a private network's site, as a corporate uplink
// does: addr is added to u's loopback interface, u's web server answers on
// it, and u's DNS server answers domain and every name below it with addr
// (A records only). No other uplink knows the domain or reaches addr.
func (u *Uplink) AddSite(t testing.TB, domain string, addr netip.Addr) {
	t.Helper()
	u.NS.IP(t, "addr", "add", netip.PrefixFrom(addr, addr.BitLen()).String(), "dev", "lo")
	u.web.serve(t, u, addr)
	u.dns.mu.Lock()
	u.dns.sites[strings.ToLower(strings.TrimSuffix(domain, "."))] = addr
	u.dns.mu.Unlock()
}

// AddLinkLocalDNS makes u's DNS server answer on the link-local address
// addr of u's end of the veth pair as well, so that a host reaches it only
// through the interface leading to u (say fe80::53%corp).
func (u *Uplink) AddLinkLocalDNS(t testing.TB, addr netip.Addr) {
	t.Helper()
	u.NS.IP(t, "addr", "add", netip.PrefixFrom(addr, 64).String(), "dev", "eth0", "nodad")
	u.dns.serve(t, u, netip.AddrPortFrom(addr.WithZone("eth0"), 53).String())
}

// Gateway is a SOCKS5 gateway proxy running in an uplink's namespace, like
// an enterprise gateway: it requires a user name and password, resolves
// names with its uplink's DNS server and connects from inside the uplink.
type Gateway struct {
	Addr netip.AddrPort

	ln   net.Listener
	done chan struct{}

	mu      sync.Mutex // protects targets
	targets []string
}

// StartGateway runs a SOCKS5 gateway on addr (an address it adds to u's
// loopback interface) that accepts only user and password. It stops at
// the end of t, or earlier with Stop.
func (u *Uplink) StartGateway(t testing.TB, addr netip.AddrPort, user, password string) *Gateway {
	t.Helper()
	u.NS.IP(t, "addr", "add", netip.PrefixFrom(addr.Addr(), addr.Addr().BitLen()).String(), "dev", "lo")
	g := &Gateway{Addr: addr, done: make(chan struct{})}
	sink := newLogSink(t)
	srv, err := socks5.New(&socks5.Config{
		AuthMethods: []socks5.Authenticator{socks5.UserPassAuthenticator{Credentials: socks5.StaticCredentials{user: password}}},
		Resolver:    gatewayResolver{u},
		Rules:       g,
		// Every socket of the gateway must be made on a thread inside the
		// uplink's namespace, or it would leave through the test host.
		Dial: func(ctx context.Context, network, address string) (net.Conn, error) {
			var c net.Conn
			err := u.NS.Do(func() (err error) {
				var d net.Dialer
				c, err = d.DialContext(ctx, network, address)
				return err
			})
			return c, err
		},
		Logger: log.New(sink, "gateway "+u.Name+": ", 0),
	})
	if err != nil {
		t.Fatalf("creating gateway: %v", err)
	}
	g.ln = u.NS.Listen(t, "tcp", addr.String())
	go func() {
		defer close(g.done)
		srv.Serve(g.ln)
	}()
	t.Cleanup(g.Stop)
	return g
}

// Allow records each request's target as the client sent it.
func (g *Gateway) Allow(ctx context.Context, req *socks5.Request) (context.Context, bool) {
	target := req.DestAddr.FQDN
	if target == "" {
		target = req.DestAddr.IP.String()
	}
	g.mu.Lock()
	g.targets = append(g.targets, fmt.Sprintf("%s:%d", target, req.DestAddr.Port))
	g.mu.Unlock()
	return ctx, true
}

// Targets returns the targets asked of g, oldest first.
func (g *Gateway) Targets() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.targets)
}

// Stop closes the gateway's listener, so that connections to it are
// refused, and waits for its accept loop to end.
func (g *Gateway) Stop() {
	g.ln.Close()
	<-g.done
}

// gatewayResolver resolves names for a gateway with its uplink's own DNS
// server, so that the uplink's query log shows them.
type gatewayResolver struct{ u *Uplink }

func (r gatewayResolver) Resolve(ctx context.Context, name string) (context.Context, net.IP, error) {
	req := new(dns.Msg).SetQuestion(dns.Fqdn(name), dns.TypeA)
	var resp *dns.Msg
	err := r.u.NS.Do(func() (err error) {
		c := &dns.Client{Timeout: 2 * time.Second}
		resp, _, err = c.Exchange(req, netip.AddrPortFrom(DNSIPv4, 53).String())
		return err
	})
	if err != nil {
		return ctx, nil, err
	}
	for _, rr := range resp.Answer {
		if a, ok := rr.(*dns.A); ok {
			return ctx, a.A, nil
		}
	}
	return ctx, nil, fmt.Errorf("gateway: no address for %s", name)
}
