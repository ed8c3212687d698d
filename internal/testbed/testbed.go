// Package testbed builds the network that iapd's end-to-end tests run in.
// A host namespace is joined by veth pairs to uplink namespaces that all use
// the same addresses, each with its own web and DNS server, and the iapd
// binary and curl run inside the host namespace. It is for tests only, needs
// root, and sends nothing outside the namespaces it creates.
package testbed

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"iapd/internal/netnstest"
)

// Addresses of the bed. Every uplink uses the same plan, so that only an
// upstream socket really bound to an interface can tell the uplinks apart.
var (
	HostIPv4    = netip.MustParseAddr("192.0.2.2")     // host's end of every veth pair
	HostIPv6    = netip.MustParseAddr("2001:db8:1::2") // host's end of every veth pair
	GatewayIPv4 = netip.MustParseAddr("192.0.2.1")     // uplink's end of its veth pair
	GatewayIPv6 = netip.MustParseAddr("2001:db8:1::1") // uplink's end of its veth pair
	WebIPv4     = netip.MustParseAddr("203.0.113.10")  // web server on every uplink's lo
	WebIPv6     = netip.MustParseAddr("2001:db8:ff::10")
	DNSIPv4     = netip.MustParseAddr("203.0.113.53") // DNS server on every uplink's lo
	DNSIPv6     = netip.MustParseAddr("2001:db8:ff::53")
)

// Options configures New. The zero value gives uplinks wifi and cell with
// the default route via wifi.
type Options struct {
	// Uplinks names the uplink namespaces and, in the host namespace, the
	// interfaces leading to them. Default ["wifi", "cell"]. A name must be
	// a valid interface name (at most 15 bytes) and must not be "lo".
	Uplinks []string

	// DefaultVia is the uplink that holds the host's IPv4 and IPv6 default
	// routes, as after the last DHCP client won. Default "wifi", or the
	// first uplink when there is no wifi.
	DefaultVia string
}

// Bed is a host namespace and its uplinks. It is removed in t.Cleanup of
// the test that made it. Its methods may be called from the test's
// goroutine and, except where noted, from others.
type Bed struct {
	Host *netnstest.NS // namespace of iapd and curl

	uplinks    map[string]*Uplink
	order      []string
	defaultVia string
}

// New builds a bed for t. It fails t if anything cannot be set up; call
// netnstest.Require first.
func New(t testing.TB, opts Options) *Bed {
	t.Helper()
	if len(opts.Uplinks) == 0 {
		opts.Uplinks = []string{"wifi", "cell"}
	}
	if opts.DefaultVia == "" {
		opts.DefaultVia = opts.Uplinks[0]
		for _, u := range opts.Uplinks {
			if u == "wifi" {
				opts.DefaultVia = u
			}
		}
	}

	b := &Bed{uplinks: make(map[string]*Uplink), order: opts.Uplinks, defaultVia: opts.DefaultVia}
	b.Host = netnstest.New(t, "host")
	configureNamespace(t, b.Host)
	// Debian and other systemd distributions set loose reverse path
	// filtering, while a new namespace starts with the check turned off.
	b.Host.Exec(t, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2", "net.ipv4.conf.default.rp_filter=2")

	for _, name := range opts.Uplinks {
		if _, dup := b.uplinks[name]; dup {
			t.Fatalf("testbed: uplink %q named twice", name)
		}
		b.uplinks[name] = newUplink(t, b, name)
	}
	if _, ok := b.uplinks[opts.DefaultVia]; !ok {
		t.Fatalf("testbed: default route via %q, which is not an uplink", opts.DefaultVia)
	}
	b.addDefaultRoutes(t)
	return b
}

// configureNamespace turns off duplicate address detection, so that IPv6
// addresses, link-local ones included, are usable as soon as they are added.
func configureNamespace(t testing.TB, n *netnstest.NS) {
	t.Helper()
	n.Exec(t, "sysctl", "-qw",
		"net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0",
		"net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
}

func (b *Bed) addDefaultRoutes(t testing.TB) {
	t.Helper()
	b.Host.IP(t, "-4", "route", "replace", "default", "via", GatewayIPv4.String(), "dev", b.defaultVia)
	b.Host.IP(t, "-6", "route", "replace", "default", "via", GatewayIPv6.String(), "dev", b.defaultVia)
}

// Uplink returns the uplink called name. It panics on an unknown name,
// which is a mistake in the test.
func (b *Bed) Uplink(name string) *Uplink {
	u, ok := b.uplinks[name]
	if !ok {
		panic(fmt.Sprintf("testbed.Bed.Uplink: no uplink %q", name))
	}
	return u
}

// Uplinks returns the uplinks in the order Options gave them.
func (b *Bed) Uplinks() []*Uplink {
	us := make([]*Uplink, 0, len(b.order))
	for _, name := range b.order {
		us = append(us, b.uplinks[name])
	}
	return us
}

// Uplink is one way out of the host: a namespace behind a veth pair with a
// web server and a DNS server on its loopback interface.
type Uplink struct {
	Name string        // uplink namespace role, and the host's interface name
	NS   *netnstest.NS // the uplink's own namespace

	bed *Bed
	web *webServer
	dns *dnsServer
}

func newUplink(t testing.TB, b *Bed, name string) *Uplink {
	t.Helper()
	u := &Uplink{Name: name, bed: b}
	u.NS = netnstest.New(t, name)
	configureNamespace(t, u.NS)
	netnstest.Veth(t, b.Host, name, u.NS, "eth0")

	u.addHostAddresses(t)
	u.NS.IP(t, "addr", "add", GatewayIPv4.String()+"/24", "dev", "eth0")
	u.NS.IP(t, "addr", "add", GatewayIPv6.String()+"/64", "dev", "eth0", "nodad")
	for _, a := range []netip.Addr{WebIPv4, DNSIPv4} {
		u.NS.IP(t, "addr", "add", netip.PrefixFrom(a, 32).String(), "dev", "lo")
	}
	// An IPv6 address stays tentative, and refuses bind, until the kernel's
	// duplicate address detection work has run, even on lo. nodad skips it.
	for _, a := range []netip.Addr{WebIPv6, DNSIPv6} {
		u.NS.IP(t, "addr", "add", netip.PrefixFrom(a, 128).String(), "dev", "lo", "nodad")
	}
	// A real router replies to ARP only for its own address on the link, so
	// an upstream socket needs a route through the gateway. Linux would
	// otherwise reply for the servers' addresses on lo too, and a socket
	// bound to the interface with no route would reach them on-link.
	u.NS.Exec(t, "sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1")
	u.NS.IP(t, "link", "set", "eth0", "up")
	b.Host.IP(t, "link", "set", name, "up")

	u.web = startWeb(t, u)
	u.dns = startDNS(t, u)
	return u
}

// addHostAddresses (re)adds the host's addresses on the uplink's interface.
// The kernel drops IPv6 addresses when a link goes down, and a network
// manager adds them again when it comes up.
func (u *Uplink) addHostAddresses(t testing.TB) {
	t.Helper()
	u.bed.Host.IP(t, "addr", "replace", HostIPv4.String()+"/24", "dev", u.Name)
	u.bed.Host.IP(t, "addr", "replace", HostIPv6.String()+"/64", "dev", u.Name, "nodad")
}

// LinkDown sets the host's interface of u down, as when Wi-Fi loses its
// access point. The kernel removes every route through it, iapd's included.
func (u *Uplink) LinkDown(t testing.TB) {
	t.Helper()
	u.bed.Host.IP(t, "link", "set", u.Name, "down")
}

// LinkUp sets the host's interface of u up again and restores what a
// network manager would: its addresses and, when u held them, the default
// routes. Routes that iapd added are iapd's to restore.
func (u *Uplink) LinkUp(t testing.TB) {
	t.Helper()
	u.bed.Host.IP(t, "link", "set", u.Name, "up")
	u.addHostAddresses(t)
	if u.bed.defaultVia == u.Name {
		u.bed.addDefaultRoutes(t)
	}
}

// Queries returns the questions u's DNS server received, oldest first, each
// as "name. TYPE" with the name in lower case (say "www.cell.test. AAAA").
func (u *Uplink) Queries() []string { return u.dns.queries() }

// ResetQueries empties u's query log.
func (u *Uplink) ResetQueries() { u.dns.reset() }

// Queried reports whether u's DNS server received a question, of any type,
// for name (with or without the trailing dot, in any case).
func (u *Uplink) Queried(name string) bool {
	name = strings.ToLower(strings.TrimSuffix(name, ".")) + "."
	for _, q := range u.dns.queries() {
		if strings.HasPrefix(q, name+" ") {
			return true
		}
	}
	return false
}

// Accepted returns how many TCP connections u's web server has accepted,
// over both address families.
func (u *Uplink) Accepted() int64 { return u.web.accepted.Load() }

// Curl runs curl inside the host namespace with -sS --max-time 10 and args,
// and returns its standard output and exit code. A non-zero exit code does
// not fail t; curl's standard error goes to t.Log. Proxy variables of the
// environment and ~/.curlrc are ignored, so that only args choose a proxy.
func (b *Bed) Curl(t testing.TB, args ...string) (out string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	cmd := b.Host.Command(ctx, "/usr/bin/curl", append([]string{"-q", "-sS", "--max-time", "10"}, args...)...)
	cmd.Env = withoutProxyVariables(os.Environ())
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	err := cmd.Run()

	code = 0
	var exitErr *exec.ExitError
	switch {
	case errors.As(err, &exitErr):
		code = exitErr.ExitCode()
	case err != nil:
		t.Fatalf("running curl %s: %v", strings.Join(args, " "), err)
	}
	t.Logf("curl %s: exit %d, stdout %q, stderr %q", strings.Join(args, " "), code, stdout.String(), strings.TrimSpace(stderr.String()))
	return stdout.String(), code
}

// withoutProxyVariables drops the variables through which curl and Go pick
// a proxy or bypass one.
func withoutProxyVariables(env []string) []string {
	out := env[:0:0]
	for _, kv := range env {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasSuffix(strings.ToLower(name), "_proxy") {
			continue
		}
		out = append(out, kv)
	}
	return out
}

// logSink writes through t.Log until closed, so that server goroutines that
// outlive the test cannot log into a finished test, which would panic.
type logSink struct {
	t testing.TB

	mu     sync.Mutex // protects closed, and is held while calling t.Log
	closed bool
}

func newLogSink(t testing.TB) *logSink {
	s := &logSink{t: t}
	t.Cleanup(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
	})
	return s
}

func (s *logSink) logf(format string, args ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closed {
		s.t.Logf(format, args...)
	}
}

// Write lets a logSink back a log.Logger.
func (s *logSink) Write(p []byte) (int, error) {
	s.logf("%s", bytes.TrimRight(p, "\n"))
	return len(p), nil
}
