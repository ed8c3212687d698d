package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"iapd/admin"
	"iapd/internal/netnstest"
	"iapd/internal/testbed"
)

// reloadStep is one version of the policy of the reload tests: browser on
// wifi and mail on cell, each with a SOCKS5 listener and optionally a DNS
// listener. browser may reach loopback targets, and accepts clients from
// loopback only, so that its listener can move to 0.0.0.0.
type reloadStep struct {
	browserListen string // browser's SOCKS5 listener
	browserDNS    string // browser's dns_listen; "" for none
	mailDNS       string // mail's dns_listen; "" for none
	extraListen   string // a second SOCKS5 listener of mail; "" for none
}

func (s reloadStep) yaml() string {
	var b strings.Builder
	fmt.Fprintf(&b, "listeners:\n  - listen: %q\n    protocol: socks5\n    app: browser\n    allow_clients: [127.0.0.0/8]\n", s.browserListen)
	b.WriteString("  - listen: \"127.0.0.1:1081\"\n    protocol: socks5\n    app: mail\n")
	if s.extraListen != "" {
		fmt.Fprintf(&b, "  - listen: %q\n    protocol: socks5\n    app: mail\n", s.extraListen)
	}
	b.WriteString("apps:\n  browser:\n    access_point: wifi\n    allow_local_targets: true\n")
	if s.browserDNS != "" {
		fmt.Fprintf(&b, "    dns_listen: %q\n", s.browserDNS)
	}
	b.WriteString("  mail:\n    access_point: cell\n")
	if s.mailDNS != "" {
		fmt.Fprintf(&b, "    dns_listen: %q\n", s.mailDNS)
	}
	b.WriteString(`access_points:
  wifi:
    interface: wifi
    dns: [203.0.113.53]
  cell:
    interface: cell
    dns: [203.0.113.53]
    gateway: [192.0.2.1]
`)
	return b.String()
}

// exchangeA sends an A query for name over c and returns the reply as
// "RCODE" followed by the addresses of the answer.
func exchangeA(c net.Conn, name string) (string, error) {
	c.SetDeadline(time.Now().Add(3 * time.Second))
	co := &dns.Conn{Conn: c}
	if err := co.WriteMsg(new(dns.Msg).SetQuestion(dns.Fqdn(name), dns.TypeA)); err != nil {
		return "", err
	}
	resp, err := co.ReadMsg()
	if err != nil {
		return "", err
	}
	out := dns.RcodeToString[resp.Rcode]
	for _, rr := range resp.Answer {
		if a, ok := rr.(*dns.A); ok {
			out += " " + a.A.String()
		}
	}
	return out, nil
}

// dialHost connects over network to addr from the bed's host namespace.
func dialHost(bed *testbed.Bed, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := bed.Host.Do(func() (err error) {
		c, err = net.DialTimeout(network, addr, 3*time.Second)
		return err
	})
	return c, err
}

// askDNS queries the DNS listener at addr in the bed's host namespace for
// name's A records over network.
func askDNS(bed *testbed.Bed, network, addr, name string) (string, error) {
	c, err := dialHost(bed, network, addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	return exchangeA(c, name)
}

// checkAnswers sends each query of want over UDP and TCP and compares the
// replies.
func checkAnswers(t *testing.T, bed *testbed.Bed, want []dnsCase) {
	t.Helper()
	for _, tt := range want {
		for _, network := range []string{"udp", "tcp"} {
			got, err := askDNS(bed, network, tt.addr, tt.host)
			if err != nil {
				t.Errorf("%s: asking %s over %s for %s: %v", tt.name, tt.addr, network, tt.host, err)
				continue
			}
			if got != tt.want {
				t.Errorf("%s: %s over %s answered %s with %q, want %q", tt.name, tt.addr, network, tt.host, got, tt.want)
			}
		}
	}
}

// dnsCase is one query to a DNS listener and the reply it must get.
type dnsCase struct {
	name string
	addr string
	host string // the name queried
	want string
}

// checkRefused checks that nothing listens on addr over UDP or TCP.
func checkRefused(t *testing.T, bed *testbed.Bed, addr string) {
	t.Helper()
	for _, network := range []string{"udp", "tcp"} {
		got, err := askDNS(bed, network, addr, "www.wifi.test")
		if err == nil || !strings.Contains(err.Error(), "connection refused") {
			t.Errorf("asking %s over %s: reply %q, error %v; want connection refused", addr, network, got, err)
		}
	}
}

// reload writes step's policy and runs "iapd reload", which must exit 0
// and print want.
func reload(t *testing.T, d *testbed.Iapd, step reloadStep, want string) {
	t.Helper()
	if err := os.WriteFile(d.PolicyPath, []byte(step.yaml()), 0o600); err != nil {
		t.Fatal(err)
	}
	out, stderr, code := d.CLI(t, "reload")
	if code != 0 || !strings.Contains(out, want) {
		t.Fatalf("iapd reload: exit %d, output %q, stderr %q; want exit 0 and %q", code, out, stderr, want)
	}
}

// Replies of the uplinks' DNS servers, each of which resolves only its own
// www name, and the DNS listeners' addresses.
var (
	wwwAnswer  = "NOERROR " + testbed.WebIPv4.String()
	notAtWifi  = "NXDOMAIN"
	dnsBrowser = "127.0.0.1:5391"
	dnsMail    = "127.0.0.1:5392"
	dnsMoved   = "127.0.0.1:5393"
	dnsTaken   = "127.0.0.1:5394"
)

func TestPrivilegedReloadDNSListeners(t *testing.T) {
	netnstest.Require(t)
	bed := testbed.New(t, testbed.Options{})
	start := reloadStep{browserListen: "127.0.0.1:1080"}
	d := bed.Start(t, start.yaml())

	// Gained: both apps get a DNS listener, each answering through its
	// own access point, and mail a SOCKS5 listener on a port the kernel
	// chooses.
	step := reloadStep{browserListen: "127.0.0.1:1080", browserDNS: dnsBrowser, mailDNS: dnsMail, extraListen: "127.0.0.1:0"}
	reload(t, d, step, "listeners 2 kept, 1 added, 0 removed; DNS listeners 0 kept, 2 added, 0 removed;")
	checkAnswers(t, bed, []dnsCase{
		{name: "added listener of browser", addr: dnsBrowser, host: "www.wifi.test", want: wwwAnswer},
		{name: "added listener of mail", addr: dnsMail, host: "www.cell.test", want: wwwAnswer},
	})

	// iapd status shows the new listeners, each DNS listener with the
	// query over UDP and the one over TCP that checkAnswers sent.
	st := statusOf(t, d)
	checkDNSListeners(t, st, []admin.DNSListenerStatus{
		{App: "browser", Listen: dnsBrowser, UDPAddress: dnsBrowser, TCPAddress: dnsBrowser, Queries: 2},
		{App: "mail", Listen: dnsMail, UDPAddress: dnsMail, TCPAddress: dnsMail, Queries: 2},
	})
	if got := listenAddrs(st); got != "127.0.0.1:1080 127.0.0.1:1081 127.0.0.1:0" {
		t.Fatalf("listeners after the reload: %s, want 127.0.0.1:1080 127.0.0.1:1081 127.0.0.1:0", got)
	}
	bound := st.Listeners[2].Address
	if host, port, _ := net.SplitHostPort(bound); host != "127.0.0.1" || port == "0" || port == "" {
		t.Errorf("listener 127.0.0.1:0 reports address %q, want 127.0.0.1 with the port the kernel chose", bound)
	}
	out, _, _ := d.CLI(t, "status")
	for _, row := range []string{
		`127\.0\.0\.1:0\s+` + regexp.QuoteMeta(bound) + `\s+socks5\s+mail\s+0\s+1024\s+0\s+0$`,
		`DNS LISTENER\s+ADDRESS\s+APP\s+QUERIES\s+REFUSED\s+FAILED$`,
		regexp.QuoteMeta(dnsBrowser) + `\s+` + regexp.QuoteMeta(dnsBrowser) + `\s+browser\s+2\s+0\s+0$`,
		regexp.QuoteMeta(dnsMail) + `\s+` + regexp.QuoteMeta(dnsMail) + `\s+mail\s+2\s+0\s+0$`,
	} {
		if !regexp.MustCompile(`(?m)^` + row).MatchString(out) {
			t.Errorf("iapd status lacks a row matching %s; output:\n%s", row, out)
		}
	}
	// The status is read before this client, which would count in OPEN
	// until iapd has seen it leave.
	if out, code := bed.Curl(t, "--socks5-hostname", bound, "http://www.cell.test/"); code != 0 || out != viaCell {
		t.Errorf("curl through the reported address %s: exit %d, body %q; want %q", bound, code, out, viaCell)
	}

	// Moved: browser's listener goes to another port, while mail's keeps
	// answering on one socket throughout the reload.
	udp, err := dialHost(bed, "udp", dnsMail)
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	var answered, failed atomic.Int64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			// A short pause keeps the query log readable.
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			got, err := exchangeA(udp, "www.cell.test")
			if err != nil || got != wwwAnswer {
				t.Logf("query to the kept listener during the reload: %q, %v", got, err)
				failed.Add(1)
				continue
			}
			answered.Add(1)
		}
	}()
	waitUntil(t, "the kept listener to answer", func() bool { return answered.Load() > 0 })
	step = reloadStep{browserListen: "127.0.0.1:1080", browserDNS: dnsMoved, mailDNS: dnsMail}
	reload(t, d, step, "DNS listeners 1 kept, 1 added, 1 removed;")
	after := answered.Load()
	waitUntil(t, "the kept listener to answer after the reload", func() bool { return answered.Load() > after })
	close(stop)
	<-done
	if failed.Load() != 0 || answered.Load() == 0 {
		t.Errorf("kept listener during the reload: %d answered, %d failed; want only answers", answered.Load(), failed.Load())
	}
	checkAnswers(t, bed, []dnsCase{{name: "moved listener", addr: dnsMoved, host: "www.wifi.test", want: wwwAnswer}})
	checkRefused(t, bed, dnsBrowser)

	// The moved listener is new and shows the two queries just sent. The
	// kept one goes on counting, and the removed ones are gone.
	st = statusOf(t, d)
	checkDNSListeners(t, st, []admin.DNSListenerStatus{
		{App: "browser", Listen: dnsMoved, UDPAddress: dnsMoved, TCPAddress: dnsMoved, Queries: 2},
		{App: "mail", Listen: dnsMail, UDPAddress: dnsMail, TCPAddress: dnsMail, Queries: 2 + uint64(answered.Load()+failed.Load())},
	})
	if got := listenAddrs(st); got != "127.0.0.1:1080 127.0.0.1:1081" {
		t.Errorf("listeners after the reload: %s, want 127.0.0.1:1080 127.0.0.1:1081", got)
	}

	// Swapped: each address passes to the other app without closing.
	step = reloadStep{browserListen: "127.0.0.1:1080", browserDNS: dnsMail, mailDNS: dnsMoved}
	reload(t, d, step, "DNS listeners 2 kept, 0 added, 0 removed;")
	checkAnswers(t, bed, []dnsCase{
		{name: "address passed to browser", addr: dnsMail, host: "www.cell.test", want: notAtWifi},
		{name: "address passed to browser", addr: dnsMail, host: "www.wifi.test", want: wwwAnswer},
		{name: "address passed to mail", addr: dnsMoved, host: "www.cell.test", want: wwwAnswer},
	})

	// Rejected: a busy port stops the whole reload, the proxy listener it
	// adds included, and the old listeners go on.
	var busy net.PacketConn
	if err := bed.Host.Do(func() (err error) {
		busy, err = net.ListenPacket("udp", dnsTaken)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	bad := reloadStep{browserListen: "127.0.0.1:1080", browserDNS: dnsTaken, mailDNS: dnsMoved, extraListen: "127.0.0.1:1082"}
	if err := os.WriteFile(d.PolicyPath, []byte(bad.yaml()), 0o600); err != nil {
		t.Fatal(err)
	}
	_, stderr, code := d.CLI(t, "reload")
	want := "iapd: reload rejected; iapd keeps serving the policy it had: opening DNS listener " + dnsTaken +
		" of app browser: listen udp " + dnsTaken + ": bind: address already in use"
	if code != 1 || !strings.Contains(stderr, want) {
		t.Errorf("iapd reload with a busy port: exit %d, stderr %q; want exit 1 and %q", code, stderr, want)
	}
	checkAnswers(t, bed, []dnsCase{
		{name: "browser's listener after the rejected reload", addr: dnsMail, host: "www.wifi.test", want: wwwAnswer},
		{name: "mail's listener after the rejected reload", addr: dnsMoved, host: "www.cell.test", want: wwwAnswer},
	})
	if _, code := bed.Curl(t, "--socks5-hostname", "127.0.0.1:1082", "http://both.test/"); code != 7 {
		t.Errorf("curl through the listener of the rejected reload: exit %d, want 7 (connection refused)", code)
	}

	// Removed, by SIGHUP: both ports refuse.
	if err := os.WriteFile(d.PolicyPath, []byte(start.yaml()), 0o600); err != nil {
		t.Fatal(err)
	}
	sent := time.Now()
	d.Signal(t, syscall.SIGHUP)
	rec := d.WaitRecord(t, 5*time.Second, sent, "policy reloaded", nil)
	if got := rec.Attr("dns_listeners_removed"); got != "2" {
		t.Errorf("SIGHUP reload removed %s DNS listeners, want 2", got)
	}
	checkRefused(t, bed, dnsMail)
	checkRefused(t, bed, dnsMoved)
	checkDNSListeners(t, statusOf(t, d), nil)
	if out, _, _ := d.CLI(t, "status"); strings.Contains(out, "DNS LISTENER") {
		t.Errorf("iapd status lists DNS listeners after they were removed:\n%s", out)
	}
}

// checkDNSListeners compares the DNS listeners of st with want, which
// lists them by app name.
func checkDNSListeners(t *testing.T, st admin.Status, want []admin.DNSListenerStatus) {
	t.Helper()
	if want == nil {
		want = []admin.DNSListenerStatus{}
	}
	if !slices.Equal(st.DNSListeners, want) {
		t.Errorf("dns_listeners = %+v, want %+v", st.DNSListeners, want)
	}
}

// listenAddrs returns the listen addresses of st's proxy listeners,
// separated by spaces.
func listenAddrs(st admin.Status) string {
	var addrs []string
	for _, l := range st.Listeners {
		addrs = append(addrs, l.Listen)
	}
	return strings.Join(addrs, " ")
}

func TestPrivilegedReloadWidensListener(t *testing.T) {
	netnstest.Require(t)
	bed := testbed.New(t, testbed.Options{})
	narrow := reloadStep{browserListen: "127.0.0.1:1080"}
	d := bed.Start(t, narrow.yaml())

	// A web server on the host's loopback, which browser may reach.
	web := bed.Host.Listen(t, "tcp", "127.0.0.1:0")
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "loopback web\n")
	})}
	go srv.Serve(web)
	t.Cleanup(func() { srv.Close() })
	target := "http://" + web.Addr().String() + "/"

	// The listener moves to an address that overlaps the old one and back.
	// 0.0.0.0 binds every address of the host namespace; the clients
	// connect to 127.0.0.1 only.
	for _, listen := range []string{"0.0.0.0:1080", "127.0.0.1:1080"} {
		reload(t, d, reloadStep{browserListen: listen}, "listeners 1 kept, 1 added, 1 removed; 0 connection(s) closed")
		out, code := bed.Curl(t, "--socks5-hostname", "127.0.0.1:1080", target)
		if code != 0 || out != "loopback web\n" {
			t.Errorf("curl through %s: exit %d, body %q; want exit 0 and %q", listen, code, out, "loopback web\n")
		}
	}
}
