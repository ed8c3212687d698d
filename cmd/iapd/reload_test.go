package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

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
	// own access point.
	step := reloadStep{browserListen: "127.0.0.1:1080", browserDNS: dnsBrowser, mailDNS: dnsMail}
	reload(t, d, step, "listeners 2 kept, 0 added, 0 removed; DNS listeners 0 kept, 2 added, 0 removed;")
	checkAnswers(t, bed, []dnsCase{
		{name: "added listener of browser", addr: dnsBrowser, host: "www.wifi.test", want: wwwAnswer},
		{name: "added listener of mail", addr: dnsMail, host: "www.cell.test", want: wwwAnswer},
	})

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
