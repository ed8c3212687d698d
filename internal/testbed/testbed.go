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
	"strconv"
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

	// BackupDefaults gives every other uplink default routes too, of
	// metric BackupMetric, as NetworkManager keeps one per connected
	// device. Without them, the main table has no default route while the
	// link of DefaultVia is down, and the host's loose reverse path
	// filtering drops every reply from off-link addresses.
	BackupDefaults bool
}

// BackupMetric is the metric of the default routes that
// Options.BackupDefaults adds, above the kernel's default for IPv6 (1024).
const BackupMetric = 2000

// Bed is a host namespace and its uplinks. It is removed in t.Cleanup of
// the test that made it. Its methods may be called from the test's
// goroutine and, except where noted, from others.
type Bed struct {
	Host *netnstest.NS // namespace of iapd and curl

	uplinks        map[string]*Uplink
	order          []string
	defaultVia     string
	backupDefaults bool
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

	b := &Bed{uplinks: make(map[string]*Uplink), order: opts.Uplinks, defaultVia: opts.DefaultVia, backupDefaults: opts.BackupDefaults}
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
	if b.backupDefaults {
		for _, u := range b.Uplinks() {
			if u.Name != b.defaultVia {
				u.addBackupDefaults(t)
			}
		}
	}
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

// addBackupDefaults adds u's default routes of BackupMetric.
func (u *Uplink) addBackupDefaults(t testing.TB) {
	t.Helper()
	metric := strconv.Itoa(BackupMetric)
	u.bed.Host.IP(t, "-4", "route", "replace", "default", "via", GatewayIPv4.String(), "dev", u.Name, "metric", metric)
	u.bed.Host.IP(t, "-6", "route", "replace", "default", "via", GatewayIPv6.String(), "dev", u.Name, "metric", metric)
}

// restoreDefaults adds back the default routes that u held before its link
// went down or was re-created, as a network manager would.
func (u *Uplink) restoreDefaults(t testing.TB) {
	t.Helper()
	switch {
	case u.bed.defaultVia == u.Name:
		u.bed.addDefaultRoutes(t)
	case u.bed.backupDefaults:
		u.addBackupDefaults(t)
	}
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
	u.connect(t)
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

	u.web = startWeb(t, u)
	u.dns = startDNS(t, u)
	return u
}

// connect creates u's veth pair, the host's end named after u and the
// uplink's end eth0, with their addresses, and sets both ends up.
func (u *Uplink) connect(t testing.TB) {
	t.Helper()
	netnstest.Veth(t, u.bed.Host, u.Name, u.NS, "eth0")
	u.addHostAddresses(t)
	u.NS.IP(t, "addr", "add", GatewayIPv4.String()+"/24", "dev", "eth0")
	u.NS.IP(t, "addr", "add", GatewayIPv6.String()+"/64", "dev", "eth0", "nodad")
	u.NS.IP(t, "link", "set", "eth0", "up")
	u.bed.Host.IP(t, "link", "set", u.Name, "up")
}

// Recreate deletes u's veth pair and creates it again under the same
// names, as when a USB modem is unplugged and plugged in again: the host's
// interface comes back with a new index. The default routes come back too
// when u held them.
func (u *Uplink) Recreate(t testing.TB) {
	t.Helper()
	u.bed.Host.IP(t, "link", "del", u.Name)
	u.connect(t)
	u.restoreDefaults(t)
}

// StopAnswering makes u's web and DNS servers go silent while the link
// stays up: TCP connections are still accepted, but no HTTP response and
// no DNS answer is sent.
func (u *Uplink) StopAnswering() {
	u.web.setSilent(true)
	u.dns.silent.Store(true)
}

// Answer makes u's servers answer again after StopAnswering.
func (u *Uplink) Answer() {
	u.web.setSilent(false)
	u.dns.silent.Store(false)
}

// DropReplies adds blackhole routes in u's namespace for the host's
// addresses, so that u drops every packet towards the host: a SYN through
// u gets no answer and a connect hangs, while the link stays up. The
// returned function removes the routes again.
func (u *Uplink) DropReplies(t testing.TB) (restore func()) {
	t.Helper()
	u.NS.IP(t, "-4", "route", "add", "blackhole", HostIPv4.String()+"/32")
	u.NS.IP(t, "-6", "route", "add", "blackhole", HostIPv6.String()+"/128")
	return func() {
		u.NS.IP(t, "-4", "route", "del", "blackhole", HostIPv4.String()+"/32")
		u.NS.IP(t, "-6", "route", "del", "blackhole", HostIPv6.String()+"/128")
	}
}

// FirstAcceptAfter returns when u's web server accepted its first
// connection after t0.
func (u *Uplink) FirstAcceptAfter(t0 time.Time) (time.Time, bool) { return u.web.firstAcceptAfter(t0) }

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
// network manager would: its addresses and the default routes it held.
// Routes that iapd added are iapd's to restore.
func (u *Uplink) LinkUp(t testing.TB) {
	t.Helper()
	u.bed.Host.IP(t, "link", "set", u.Name, "up")
	u.addHostAddresses(t)
	u.restoreDefaults(t)
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

// CurlProcess is a curl started with StartCurl that may still be running.
type CurlProcess struct {
	cmd  *exec.Cmd
	done chan struct{} // closed when curl has exited
	code int           // exit code; valid once done is closed

	mu     sync.Mutex // protects stdout
	stdout bytes.Buffer
}

// StartCurl starts curl inside the host namespace like Curl, but with
// --max-time 25 and without waiting for it. The test's cleanup kills it
// if it is still running.
func (b *Bed) StartCurl(t testing.TB, args ...string) *CurlProcess {
	t.Helper()
	p := &CurlProcess{done: make(chan struct{})}
	p.cmd = b.Host.Command(context.Background(), "/usr/bin/curl", append([]string{"-q", "-sS", "-N", "--max-time", "25"}, args...)...)
	p.cmd.Env = withoutProxyVariables(os.Environ())
	p.cmd.Stdout = lockedBuffer{p}
	sink := newLogSink(t)
	p.cmd.Stderr = sink
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting curl %s: %v", strings.Join(args, " "), err)
	}
	go func() {
		err := p.cmd.Wait()
		var exitErr *exec.ExitError
		if errors.As(err, &exitErr) {
			p.code = exitErr.ExitCode()
		}
		sink.logf("curl %s: exit %d", strings.Join(args, " "), p.code)
		close(p.done)
	}()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
	})
	return p
}

// lockedBuffer lets curl write into its process's buffer while the test
// reads it.
type lockedBuffer struct{ p *CurlProcess }

func (w lockedBuffer) Write(b []byte) (int, error) {
	w.p.mu.Lock()
	defer w.p.mu.Unlock()
	return w.p.stdout.Write(b)
}

// Output returns what curl has written to its standard output so far.
func (p *CurlProcess) Output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stdout.String()
}

// WaitOutput waits until curl's standard output contains s, and reports
// false when timeout passes first.
func (p *CurlProcess) WaitOutput(s string, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for !strings.Contains(p.Output(), s) {
		if time.Now().After(deadline) {
			return false
		}
		select {
		case <-p.done:
			return strings.Contains(p.Output(), s)
		case <-time.After(10 * time.Millisecond):
		}
	}
	return true
}

// Wait waits up to timeout for curl to exit and returns its exit code;
// exited is false when it is still running.
func (p *CurlProcess) Wait(timeout time.Duration) (code int, exited bool) {
	select {
	case <-p.done:
		return p.code, true
	case <-time.After(timeout):
		return 0, false
	}
}

// Finish waits for curl to exit and returns its standard output and exit
// code. It fails t when curl is still running after 30 seconds.
func (p *CurlProcess) Finish(t testing.TB) (string, int) {
	t.Helper()
	code, exited := p.Wait(30 * time.Second)
	if !exited {
		t.Fatal("curl did not exit within 30 s")
	}
	return p.Output(), code
}

// Exited reports whether curl has exited, and its exit code if so.
func (p *CurlProcess) Exited() (code int, exited bool) { return p.Wait(0) }

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
