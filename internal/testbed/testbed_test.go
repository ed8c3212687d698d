package testbed

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"iapd/internal/netnstest"
)

func TestPrivilegedWebAnswersThroughDefaultRoute(t *testing.T) {
	netnstest.Require(t)
	tests := []struct {
		name       string
		defaultVia string
		url        string
		want       string
	}{
		{name: "wifi v4", defaultVia: "wifi", url: "http://203.0.113.10/", want: "uplink=wifi client=192.0.2.2\n"},
		{name: "wifi v6", defaultVia: "wifi", url: "http://[2001:db8:ff::10]/", want: "uplink=wifi client=2001:db8:1::2\n"},
		{name: "cell v4", defaultVia: "cell", url: "http://203.0.113.10/", want: "uplink=cell client=192.0.2.2\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := New(t, Options{DefaultVia: tt.defaultVia})
			out, code := b.Curl(t, tt.url)
			if code != 0 {
				t.Fatalf("curl exit code %d, want 0", code)
			}
			if out != tt.want {
				t.Errorf("body %q, want %q", out, tt.want)
			}
			if got := b.Uplink(tt.defaultVia).Accepted(); got != 1 {
				t.Errorf("%s accepted %d connections, want 1", tt.defaultVia, got)
			}
			for _, u := range b.Uplinks() {
				if u.Name != tt.defaultVia && u.Accepted() != 0 {
					t.Errorf("%s accepted %d connections, want 0", u.Name, u.Accepted())
				}
			}
		})
	}
}

func TestPrivilegedDNSAnswers(t *testing.T) {
	netnstest.Require(t)
	b := New(t, Options{})

	tests := []struct {
		name   string
		server string
		net    string
		qname  string
		qtype  uint16
		rcode  int
		answer string // address in the answer, "" for none
	}{
		{name: "own name A", server: "203.0.113.53:53", net: "udp", qname: "www.wifi.test.", qtype: dns.TypeA, rcode: dns.RcodeSuccess, answer: "203.0.113.10"},
		{name: "own name AAAA", server: "203.0.113.53:53", net: "udp", qname: "WWW.wifi.test.", qtype: dns.TypeAAAA, rcode: dns.RcodeSuccess, answer: "2001:db8:ff::10"},
		{name: "own name over tcp", server: "203.0.113.53:53", net: "tcp", qname: "www.wifi.test.", qtype: dns.TypeA, rcode: dns.RcodeSuccess, answer: "203.0.113.10"},
		{name: "v6 server", server: "[2001:db8:ff::53]:53", net: "udp", qname: "www.wifi.test.", qtype: dns.TypeA, rcode: dns.RcodeSuccess, answer: "203.0.113.10"},
		{name: "v6 server over tcp", server: "[2001:db8:ff::53]:53", net: "tcp", qname: "v6.wifi.test.", qtype: dns.TypeAAAA, rcode: dns.RcodeSuccess, answer: "2001:db8:ff::10"},
		{name: "v6 only name has no A", server: "203.0.113.53:53", net: "udp", qname: "v6.wifi.test.", qtype: dns.TypeA, rcode: dns.RcodeSuccess},
		{name: "shared name", server: "203.0.113.53:53", net: "udp", qname: "both.test.", qtype: dns.TypeA, rcode: dns.RcodeSuccess, answer: "203.0.113.10"},
		{name: "other uplink's name", server: "203.0.113.53:53", net: "udp", qname: "www.cell.test.", qtype: dns.TypeA, rcode: dns.RcodeNameError},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := new(dns.Msg)
			req.SetQuestion(tt.qname, tt.qtype)
			var resp *dns.Msg
			// The host's default route leads to wifi, whose server answers.
			err := b.Host.Do(func() (err error) {
				resp, _, err = (&dns.Client{Net: tt.net}).Exchange(req, tt.server)
				return err
			})
			if err != nil {
				t.Fatalf("querying %s: %v", tt.server, err)
			}
			if resp.Rcode != tt.rcode {
				t.Errorf("rcode %s, want %s", dns.RcodeToString[resp.Rcode], dns.RcodeToString[tt.rcode])
			}
			var got string
			for _, rr := range resp.Answer {
				switch rr := rr.(type) {
				case *dns.A:
					got = rr.A.String()
				case *dns.AAAA:
					got = rr.AAAA.String()
				}
			}
			if got != tt.answer {
				t.Errorf("answer %q, want %q", got, tt.answer)
			}
			if !resp.Authoritative {
				t.Error("answer is not authoritative")
			}
		})
	}

	wifi, cell := b.Uplink("wifi"), b.Uplink("cell")
	if !wifi.Queried("www.cell.test") {
		t.Errorf("wifi query log %q lacks www.cell.test", wifi.Queries())
	}
	if !slices.Contains(wifi.Queries(), "www.wifi.test. AAAA") {
		t.Errorf("wifi query log %q lacks %q", wifi.Queries(), "www.wifi.test. AAAA")
	}
	if q := cell.Queries(); len(q) != 0 {
		t.Errorf("cell query log %q, want empty", q)
	}
	wifi.ResetQueries()
	if q := wifi.Queries(); len(q) != 0 {
		t.Errorf("wifi query log after reset %q, want empty", q)
	}
}

// TestPrivilegedBindingNeedsRoute checks that the uplinks behave like real
// routers: a socket bound to an interface that holds no route to the target
// does not reach it, so iapd must install routes of its own.
func TestPrivilegedBindingNeedsRoute(t *testing.T) {
	netnstest.Require(t)
	b := New(t, Options{})
	for _, url := range []string{"http://203.0.113.10/", "http://[2001:db8:ff::10]/"} {
		if out, code := b.Curl(t, "--interface", "cell", "--connect-timeout", "1", url); code == 0 {
			t.Errorf("curl bound to cell without a route to %s: exit 0 and %q, want a failure", url, out)
		}
	}
	if n := b.Uplink("cell").Accepted(); n != 0 {
		t.Errorf("cell accepted %d connections, want 0", n)
	}

	b.Host.IP(t, "route", "add", "203.0.113.10/32", "via", "192.0.2.1", "dev", "cell")
	out, code := b.Curl(t, "--interface", "cell", "http://203.0.113.10/")
	if code != 0 || out != "uplink=cell client=192.0.2.2\n" {
		t.Errorf("curl bound to cell with a route: exit %d and %q, want exit 0 and uplink=cell", code, out)
	}
}

func TestPrivilegedLinkDownAndUp(t *testing.T) {
	netnstest.Require(t)
	b := New(t, Options{})
	wifi := b.Uplink("wifi")

	wifi.LinkDown(t)
	if out, code := b.Curl(t, "http://203.0.113.10/"); code == 0 {
		t.Errorf("curl with the default route's link down: exit 0 and %q, want a failure", out)
	}

	wifi.LinkUp(t)
	for _, url := range []string{"http://203.0.113.10/", "http://[2001:db8:ff::10]/"} {
		out, code := b.Curl(t, url)
		if code != 0 || !strings.HasPrefix(out, "uplink=wifi ") {
			t.Errorf("curl %s after link up: exit %d and %q, want exit 0 and uplink=wifi", url, code, out)
		}
	}
}

// TestPrivilegedUplinkFaults checks the faults a test can put into an
// uplink, with curl following the host's default route through wifi.
func TestPrivilegedUplinkFaults(t *testing.T) {
	netnstest.Require(t)
	b := New(t, Options{})
	wifi := b.Uplink("wifi")
	const url = "http://203.0.113.10/"
	const curlTimeout = 28 // CURLE_OPERATION_TIMEDOUT

	held := b.StartCurl(t, url+"hold")
	if !held.WaitOutput("uplink=wifi client=192.0.2.2\n", 2*time.Second) {
		t.Errorf("/hold sent %q, want the uplink line", held.Output())
	}

	wifi.StopAnswering()
	if _, code := b.Curl(t, "--max-time", "0.5", url); code != curlTimeout {
		t.Errorf("curl while wifi is silent: exit %d, want %d", code, curlTimeout)
	}
	wifi.Answer()
	if out, code := b.Curl(t, url); code != 0 || out != "uplink=wifi client=192.0.2.2\n" {
		t.Errorf("curl after wifi answers again: exit %d and %q", code, out)
	}

	restore := wifi.DropReplies(t)
	start := time.Now()
	if _, code := b.Curl(t, "--connect-timeout", "0.5", url); code != curlTimeout {
		t.Errorf("curl while wifi drops replies: exit %d, want %d", code, curlTimeout)
	}
	restore()
	if out, code := b.Curl(t, url); code != 0 || out != "uplink=wifi client=192.0.2.2\n" {
		t.Errorf("curl after wifi stops dropping: exit %d and %q", code, out)
	}
	if at, ok := wifi.FirstAcceptAfter(start); !ok || at.Before(start) {
		t.Errorf("FirstAcceptAfter = %v, %v, want the last curl's connection", at, ok)
	}

	before := b.Host.IP(t, "-o", "link", "show", "wifi")
	wifi.Recreate(t)
	after := b.Host.IP(t, "-o", "link", "show", "wifi")
	if strings.SplitN(before, ":", 2)[0] == strings.SplitN(after, ":", 2)[0] {
		t.Errorf("re-created wifi kept its index: %q", after)
	}
	// TCP does not notice that the link under a connection is gone: the
	// client waits on, which is why iapd closes the connections of an
	// access point that is lost.
	if code, exited := held.Wait(300 * time.Millisecond); exited {
		t.Errorf("held request over the deleted link exited with %d, want it waiting", code)
	}
	if out, code := b.Curl(t, url); code != 0 || out != "uplink=wifi client=192.0.2.2\n" {
		t.Errorf("curl after wifi was re-created: exit %d and %q", code, out)
	}
}

func TestPrivilegedLeftoversFound(t *testing.T) {
	netnstest.Require(t)
	b := New(t, Options{Uplinks: []string{"wifi"}})
	if left := b.Leftovers(t); len(left) != 0 {
		t.Fatalf("new bed has leftovers %q", left)
	}

	b.Host.IP(t, "rule", "add", "fwmark", "0x1a900", "lookup", "18100", "priority", "18100")
	b.Host.IP(t, "-6", "route", "add", "default", "via", "2001:db8:1::1", "dev", "wifi", "table", "18101")
	left := b.Leftovers(t)
	want := []string{
		"rule 18100:\tfrom all fwmark 0x1a900 lookup 18100",
		"route default via 2001:db8:1::1 dev wifi table 18101 metric 1024 pref medium",
	}
	if !slices.Equal(left, want) {
		t.Errorf("leftovers %q, want %q", left, want)
	}
}

func TestDNSRecords(t *testing.T) {
	d := &dnsServer{uplink: "cell"}
	tests := []struct {
		name   string
		qname  string
		v4, v6 string
		known  bool
	}{
		{name: "own www", qname: "www.cell.test.", v4: "203.0.113.10", v6: "2001:db8:ff::10", known: true},
		{name: "own v6", qname: "v6.cell.test.", v6: "2001:db8:ff::10", known: true},
		{name: "shared", qname: "both.test.", v4: "203.0.113.10", known: true},
		{name: "under shared", qname: "n1.both.test.", v4: "203.0.113.10", known: true},
		{name: "other uplink", qname: "www.wifi.test."},
		{name: "outside the zone", qname: "example.com."},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v4, v6, known := d.records(tt.qname)
			if known != tt.known {
				t.Errorf("known %v, want %v", known, tt.known)
			}
			if got := addrString(v4); got != tt.v4 {
				t.Errorf("A %q, want %q", got, tt.v4)
			}
			if got := addrString(v6); got != tt.v6 {
				t.Errorf("AAAA %q, want %q", got, tt.v6)
			}
		})
	}
}

func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}
