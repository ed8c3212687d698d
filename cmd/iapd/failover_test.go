package main

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"iapd/internal/netnstest"
	"iapd/internal/testbed"
)

// These tests run iapd as a connection manager in a test bed: destinations
// of several uplinks, with links going down and up, servers going silent,
// SYNs dropped and interfaces re-created under it. Intervals and hold-downs
// are short so that the tests stay quick.

// failoverPolicy has the app browser on the destination internet, which
// closes its connections on a lost access point, and the app sync on
// patient, which keeps them. Both prefer wifi over cell and fail back
// after a hold-down of one second.
const failoverPolicy = `
listeners:
  - listen: "127.0.0.1:1080"
    protocol: socks5
    app: browser
  - listen: "127.0.0.1:1081"
    protocol: socks5
    app: sync
  - listen: "127.0.0.1:3128"
    protocol: http
    app: browser
apps:
  browser: {destination: internet}
  sync: {destination: patient}
access_points:
  wifi:
    interface: wifi
    dns: [203.0.113.53]
  cell:
    interface: cell
    dns: [203.0.113.53]
    gateway: [192.0.2.1, "2001:db8:1::1"]
interfaces:
  wifi: {type: wifi}
  cell: {type: cellular}
destinations:
  internet:
    access_points: [wifi, cell]
    hold_down: 1s
  patient:
    access_points: [wifi, cell]
    hold_down: 1s
    on_lost: keep
`

// curlUntil runs curl with args until it prints want, and fails t when
// that does not happen within timeout.
func curlUntil(t *testing.T, bed *testbed.Bed, timeout time.Duration, want string, args ...string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		out, code := bed.Curl(t, append([]string{"--max-time", "1"}, args...)...)
		if code == 0 && out == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("curl %s: exit %d and %q after %v, want exit 0 and %q", strings.Join(args, " "), code, out, timeout, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// wantLines fails t unless text contains each of lines, in order.
func wantLines(t *testing.T, what, text string, lines ...string) {
	t.Helper()
	rest := text
	for _, line := range lines {
		i := strings.Index(rest, line)
		if i < 0 {
			t.Errorf("%s lacks %q (in order):\n%s", what, line, text)
			return
		}
		rest = rest[i+len(line):]
	}
}

func TestPrivilegedFailoverOnLinkDown(t *testing.T) {
	netnstest.Require(t)
	// cell keeps a default route of a higher metric, as on a laptop whose
	// network manager runs both; see testbed.Options.BackupDefaults.
	bed := testbed.New(t, testbed.Options{BackupDefaults: true})
	d := bed.Start(t, failoverPolicy)
	wifi, cell := bed.Uplink("wifi"), bed.Uplink("cell")
	browser := []string{"--socks5-hostname", "127.0.0.1:1080", "http://both.test/"}

	if out, code := bed.Curl(t, browser...); code != 0 || out != viaWifi {
		t.Fatalf("with both links up: exit %d and %q, want exit 0 and %q", code, out, viaWifi)
	}
	// One connection of each destination stays open over wifi.
	// /hold sends the uplink line, then waits: a download in progress.
	closing := bed.StartCurl(t, "--socks5-hostname", "127.0.0.1:1080", "http://both.test/hold")
	keeping := bed.StartCurl(t, "--socks5-hostname", "127.0.0.1:1081", "http://both.test/hold")
	for _, s := range []*testbed.CurlProcess{closing, keeping} {
		if !s.WaitOutput(viaWifi, 3*time.Second) {
			t.Fatalf("held download sent %q, want it to start over wifi", s.Output())
		}
	}

	// The failover time runs from just before the kernel takes the link
	// down to the first connection that cell accepts.
	t0 := time.Now()
	wifi.LinkDown(t)
	curlUntil(t, bed, 3*time.Second, viaCell, browser...)
	at, ok := cell.FirstAcceptAfter(t0)
	if !ok {
		t.Fatal("cell accepted no connection after wifi went down")
	}
	failover := at.Sub(t0)
	t.Logf("failover_ms=%d", failover.Milliseconds())
	if failover > 2*time.Second {
		t.Errorf("first connection on cell %v after wifi went down, want within 2s", failover)
	}

	// on_lost: close resets the connection of internet at once, while
	// patient keeps its own.
	if code, exited := closing.Wait(2*time.Second - time.Since(t0)); !exited || code == 0 {
		t.Errorf("browser's download over the lost wifi: exited %v with code %d, want closed with an error within 2s", exited, code)
	}
	if code, exited := keeping.Exited(); exited {
		t.Errorf("sync's download exited with code %d, want it kept open (on_lost: keep)", code)
	}

	for _, rec := range []struct {
		msg   string
		attrs map[string]string
	}{
		{"interface_down", map[string]string{"interface": "wifi"}},
		{"access_point_unusable", map[string]string{"access_point": "wifi", "reason": "interface wifi is down"}},
		{"connections_closed", map[string]string{"destination": "internet", "access_point": "wifi", "count": "1"}},
		{"destination_switched", map[string]string{"destination": "internet", "from": "wifi", "to": "cell"}},
		{"destination_switched", map[string]string{"destination": "patient", "from": "wifi", "to": "cell"}},
	} {
		if r := d.WaitRecord(t, 2*time.Second, t0, rec.msg, rec.attrs); r.Level != "INFO" {
			t.Errorf("%q logged at %s, want INFO", rec.msg, r.Level)
		}
	}
	if n := len(d.Records("connections_closed", map[string]string{"destination": "patient"})); n != 0 {
		t.Errorf("logged %d closes of patient's connections, want none", n)
	}

	wantLines(t, "explain with wifi down", bed.Explain(t, d, "--app", "browser", "--target", "both.test:80"),
		"destination: internet\n",
		"rules:       select priority, hold-down 1s, on_lost close, on_better keep\n",
		"  1. wifi: interface wifi (wifi, cost 0, unmetered)\n       unusable: interface wifi is down\n",
		"  2. cell: interface cell (cellular, cost 0, metered)\n       usable\n",
		"would use: cell, first usable in the destination's order\n",
	)

	// Back up: new connections stay on cell for the hold-down, then return.
	t1 := time.Now()
	wifi.LinkUp(t)
	usable := d.WaitRecord(t, 3*time.Second, t1, "access_point_usable", map[string]string{"access_point": "wifi"})
	if out, code := bed.Curl(t, browser...); code != 0 || out != viaCell {
		t.Errorf("right after wifi came back: exit %d and %q, want exit 0 and %q (hold-down)", code, out, viaCell)
	}
	curlUntil(t, bed, 4*time.Second, viaWifi, browser...)
	back, ok := wifi.FirstAcceptAfter(usable.Time)
	if !ok {
		t.Fatal("wifi accepted no connection after it came back")
	}
	failBack := back.Sub(usable.Time)
	t.Logf("failback_ms=%d (hold-down 1000)", failBack.Milliseconds())
	if failBack < time.Second || failBack > 2500*time.Millisecond {
		t.Errorf("first connection on wifi %v after it was usable again, want after the hold-down of 1s and within 2.5s", failBack)
	}
	d.WaitRecord(t, time.Second, t1, "interface_up", map[string]string{"interface": "wifi"})
	d.WaitRecord(t, time.Second, t1, "destination_switched", map[string]string{"destination": "internet", "from": "cell", "to": "wifi"})
}

// probePolicy gives wifi a probe of its web server every 300ms, which
// three failures take down and one pass brings back, and two failed dials
// take down sooner. wifi's resolver gives up after 100ms.
const probePolicy = `
listeners:
  - listen: "127.0.0.1:1080"
    protocol: socks5
    app: browser
apps:
  browser: {destination: internet}
access_points:
  wifi:
    interface: wifi
    dns: [203.0.113.53]
    dns_timeouts: [100ms]
    probe: {http: "http://203.0.113.10/", interval: 300ms, timeout: 200ms, failures: 3, successes: 1, dial_failures: 2}
  cell:
    interface: cell
    dns: [203.0.113.53]
    gateway: [192.0.2.1, "2001:db8:1::1"]
destinations:
  internet:
    access_points: [wifi, cell]
    hold_down: 0s
`

func TestPrivilegedProbeFailure(t *testing.T) {
	netnstest.Require(t)
	bed := testbed.New(t, testbed.Options{})
	d := bed.Start(t, probePolicy)
	wifi := bed.Uplink("wifi")
	t.Cleanup(wifi.Answer)
	const interval, failures = 300 * time.Millisecond, 3

	// wifi is usable once its first probe passed.
	curlUntil(t, bed, 2*time.Second, viaWifi, "--socks5-hostname", "127.0.0.1:1080", "http://both.test/")

	// The link stays up while wifi's servers stop answering: the probe
	// alone takes it down within interval × failures plus the timeout of
	// the last probe, and here 400 ms for a busy machine.
	t0 := time.Now()
	wifi.StopAnswering()
	down := d.WaitRecord(t, 3*time.Second, t0, "access_point_unusable", map[string]string{"access_point": "wifi"})
	byProbe := down.Time.Sub(t0)
	t.Logf("probe_unusable_ms=%d (interval×failures %d)", byProbe.Milliseconds(), (interval * failures).Milliseconds())
	if limit := interval*failures + 200*time.Millisecond + 400*time.Millisecond; byProbe > limit {
		t.Errorf("unusable %v after the servers went silent, want within %v", byProbe, limit)
	}
	if reason := down.Attr("reason"); !strings.HasPrefix(reason, "probe failed: ") {
		t.Errorf("reason %q, want a probe failure", reason)
	}
	curlUntil(t, bed, time.Second, viaCell, "--socks5-hostname", "127.0.0.1:1080", "http://both.test/")
	wantLines(t, "explain with the probe failing", bed.Explain(t, d, "--app", "browser", "--target", "both.test:80", "--probe"),
		"  1. wifi: interface wifi (no type, cost 0, unmetered)\n       unusable: probe failed: ",
		"       probe: http http://203.0.113.10/ every 300ms: failed: ",
		"  2. cell: interface cell (no type, cost 0, unmetered)\n       usable\n",
		"would use: cell, first usable in the destination's order\n",
	)

	// Servers back: one pass makes wifi usable again.
	t1 := time.Now()
	wifi.Answer()
	d.WaitRecord(t, 3*time.Second, t1, "access_point_usable", map[string]string{"access_point": "wifi"})
	curlUntil(t, bed, 2*time.Second, viaWifi, "--socks5-hostname", "127.0.0.1:1080", "http://both.test/")

	// Silent again, with traffic: names that wifi's resolver has not
	// cached get no answer there, each connection fails over to cell, and
	// the second failed dial takes wifi down before the probe can.
	t2 := time.Now()
	wifi.StopAnswering()
	for i := range 2 {
		out, code := bed.Curl(t, "--socks5-hostname", "127.0.0.1:1080", fmt.Sprintf("http://n%d.both.test/", i))
		if code != 0 || out != viaCell {
			t.Errorf("connection %d while wifi is silent: exit %d and %q, want exit 0 and %q", i, code, out, viaCell)
		}
	}
	down = d.WaitRecord(t, 3*time.Second, t2, "access_point_unusable", map[string]string{"access_point": "wifi"})
	byDials := down.Time.Sub(t2)
	t.Logf("dial_unusable_ms=%d", byDials.Milliseconds())
	if reason := down.Attr("reason"); !strings.HasPrefix(reason, "2 dials in a row failed: ") {
		t.Errorf("reason %q, want the failed dials", reason)
	}
	if byDials >= interval*failures {
		t.Errorf("failed dials took wifi down after %v, want sooner than the probe's %v", byDials, interval*failures)
	}
}

// racePolicy races wifi against cell with the default delay of 250ms.
const racePolicy = `
listeners:
  - listen: "127.0.0.1:1080"
    protocol: socks5
    app: browser
  - listen: "127.0.0.1:3128"
    protocol: http
    app: browser
apps:
  browser: {destination: internet}
access_points:
  wifi:
    interface: wifi
    dns: [203.0.113.53]
  cell:
    interface: cell
    dns: [203.0.113.53]
    gateway: [192.0.2.1, "2001:db8:1::1"]
destinations:
  internet:
    access_points: [wifi, cell]
    select: race
`

func TestPrivilegedRaceDropsSYN(t *testing.T) {
	netnstest.Require(t)
	bed := testbed.New(t, testbed.Options{})
	bed.Start(t, racePolicy)
	bed.Uplink("wifi").DropReplies(t)
	const raceDelay = 250 * time.Millisecond

	tests := []struct {
		name string
		args []string
	}{
		{name: "socks5 address", args: []string{"--socks5", "127.0.0.1:1080", "http://203.0.113.10/"}},
		{name: "socks5 name", args: []string{"--socks5-hostname", "127.0.0.1:1080", "http://both.test/"}},
		{name: "http get", args: []string{"-x", "http://127.0.0.1:3128", "http://both.test/"}},
		{name: "http connect", args: []string{"-p", "-x", "http://127.0.0.1:3128", "http://both.test/"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, code := bed.Curl(t, append([]string{"-w", "%{time_total}"}, tt.args...)...)
			body, took, _ := strings.Cut(out, "\n")
			if code != 0 || body+"\n" != viaCell {
				t.Fatalf("exit %d and %q, want exit 0 and %q", code, out, viaCell)
			}
			seconds, err := strconv.ParseFloat(took, 64)
			if err != nil {
				t.Fatalf("curl's time_total %q: %v", took, err)
			}
			elapsed := time.Duration(seconds * float64(time.Second))
			t.Logf("race_ms=%d", elapsed.Milliseconds())
			// The race delay plus a round trip, with room for a busy machine.
			if elapsed < raceDelay || elapsed > raceDelay+300*time.Millisecond {
				t.Errorf("took %v, want between the race delay %v and %v", elapsed, raceDelay, raceDelay+300*time.Millisecond)
			}
		})
	}
}

// costPolicy prefers the cheaper of ethernet (cost 0) and cellular (cost
// 10), for any app and for an app that must not use metered access points.
const costPolicy = `
listeners:
  - listen: "127.0.0.1:1080"
    protocol: socks5
    app: any
  - listen: "127.0.0.1:1081"
    protocol: socks5
    app: unmetered
apps:
  any: {destination: cheap}
  unmetered:
    destination: cheap
    require: {metered: false}
access_points:
  cell:
    interface: cell
    dns: [203.0.113.53]
    gateway: [192.0.2.1, "2001:db8:1::1"]
  eth:
    interface: eth
    dns: [203.0.113.53]
interfaces:
  eth: {type: ethernet, cost: 0}
  cell: {type: cellular, cost: 10}
destinations:
  cheap:
    access_points: [cell, eth]
    select: cost
    hold_down: 0s
`

func TestPrivilegedCostAndRequirement(t *testing.T) {
	netnstest.Require(t)
	bed := testbed.New(t, testbed.Options{Uplinks: []string{"eth", "cell"}, DefaultVia: "eth", BackupDefaults: true})
	d := bed.Start(t, costPolicy)
	eth, cell := bed.Uplink("eth"), bed.Uplink("cell")
	const viaEth = "uplink=eth client=192.0.2.2\n"
	anyApp := []string{"--socks5-hostname", "127.0.0.1:1080"}
	unmetered := []string{"--socks5-hostname", "127.0.0.1:1081"}

	for _, args := range [][]string{anyApp, unmetered} {
		if out, code := bed.Curl(t, append(args, "http://both.test/")...); code != 0 || out != viaEth {
			t.Errorf("with both usable: exit %d and %q, want exit 0 and %q", code, out, viaEth)
		}
	}
	if n := cell.Accepted(); n != 0 {
		t.Errorf("cell accepted %d connections while ethernet was usable, want 0", n)
	}
	wantLines(t, "explain with both usable", bed.Explain(t, d, "--app", "any", "--target", "both.test:80"),
		"rules:       select cost, hold-down 0s, on_lost close, on_better keep\n",
		"  1. cell: interface cell (cellular, cost 10, metered)\n       usable\n",
		"  2. eth: interface eth (ethernet, cost 0, unmetered)\n       usable\n",
		"would use: eth, lowest cost (0)\nthen:      cell\n",
	)

	t0 := time.Now()
	eth.LinkDown(t)
	d.WaitRecord(t, 2*time.Second, t0, "access_point_unusable", map[string]string{"access_point": "eth"})
	curlUntil(t, bed, 2*time.Second, viaCell, append(anyApp, "http://both.test/")...)

	// The app that requires unmetered is refused rather than carried by
	// cellular, and nothing of its connection reaches cell.
	cell.ResetQueries()
	accepted := cell.Accepted()
	wantSOCKS5Refused(t, bed, "127.0.0.1:1081", "u1.both.test", "u2.both.test")
	wantUntouched(t, cell, accepted)
	wantLines(t, "explain for the unmetered app", bed.Explain(t, d, "--app", "unmetered", "--target", "u1.both.test:80"),
		"requires:    unmetered\n",
		"  1. cell: interface cell (cellular, cost 10, metered)\n       usable, but left out: interface cell is metered, and the app requires unmetered\n",
		"  2. eth: interface eth (ethernet, cost 0, unmetered)\n       unusable: interface eth is down\n",
		"would use: none; SOCKS5 clients get reply 3 (network unreachable) and HTTP clients 503 with:\n",
	)

	eth.LinkUp(t)
	curlUntil(t, bed, 3*time.Second, viaEth, append(anyApp, "http://both.test/")...)
	curlUntil(t, bed, time.Second, viaEth, append(unmetered, "http://both.test/")...)
}

// wantSOCKS5Refused checks that the SOCKS5 listener at proxy refuses a
// connection with reply 3 (network unreachable): curl's to first and a
// plain request's to second, both on port 80.
func wantSOCKS5Refused(t *testing.T, bed *testbed.Bed, proxy, first, second string) {
	t.Helper()
	const curlProxyError = 97 // CURLE_PROXY: the SOCKS5 server replied with a failure
	if out, code := bed.Curl(t, "--socks5-hostname", proxy, "http://"+first+"/"); code != curlProxyError {
		t.Errorf("curl through %s to %s: exit %d and %q, want %d", proxy, first, code, out, curlProxyError)
	}
	if got := socks5Reply(t, bed, proxy, second, 80); got != 3 {
		t.Errorf("SOCKS5 reply %d for %s, want 3 (network unreachable)", got, second)
	}
}

// wantUntouched checks that u's web server accepted no connection after
// its count was before, and that its DNS server was asked nothing since
// its query log was last reset.
func wantUntouched(t *testing.T, u *testbed.Uplink, before int64) {
	t.Helper()
	if n := u.Accepted() - before; n != 0 {
		t.Errorf("%s accepted %d connections, want none", u.Name, n)
	}
	if q := u.Queries(); len(q) != 0 {
		t.Errorf("%s's DNS server was asked %q, want nothing", u.Name, q)
	}
}

// socks5Reply sends a SOCKS5 CONNECT for host:port to the proxy at addr
// from inside the bed's host namespace and returns the reply code.
func socks5Reply(t *testing.T, bed *testbed.Bed, addr, host string, port uint16) byte {
	t.Helper()
	var reply byte
	err := bed.Host.Do(func() error {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		req := []byte{5, 1, 0, 5, 1, 0, 3, byte(len(host))}
		req = append(req, host...)
		req = binary.BigEndian.AppendUint16(req, port)
		if _, err := c.Write(req); err != nil {
			return err
		}
		resp := make([]byte, 4)
		if _, err := io.ReadFull(c, resp); err != nil {
			return fmt.Errorf("reading the method and reply: %w", err)
		}
		reply = resp[3]
		return nil
	})
	if err != nil {
		t.Fatalf("SOCKS5 CONNECT to %s:%d through %s: %v", host, port, addr, err)
	}
	return reply
}

func TestPrivilegedFailClosed(t *testing.T) {
	netnstest.Require(t)
	// The host's default route leads to lan, which no access point uses:
	// a leak would show up there.
	bed := testbed.New(t, testbed.Options{Uplinks: []string{"wifi", "cell", "lan"}, DefaultVia: "lan"})
	d := bed.Start(t, failoverPolicy)
	lan := bed.Uplink("lan")

	t0 := time.Now()
	bed.Uplink("wifi").LinkDown(t)
	bed.Uplink("cell").LinkDown(t)
	d.WaitRecord(t, 2*time.Second, t0, "destination_switched", map[string]string{"destination": "internet", "to": ""})
	lan.ResetQueries()
	accepted := lan.Accepted()

	wantSOCKS5Refused(t, bed, "127.0.0.1:1080", "f1.both.test", "f2.both.test")
	out, code := bed.Curl(t, "-x", "http://127.0.0.1:3128", "-w", "%{http_code}", "http://f3.both.test/")
	body, status := strings.TrimSuffix(out[:max(len(out)-3, 0)], "\n"), out[max(len(out)-3, 0):]
	if code != 0 || status != "503" {
		t.Errorf("http get with every access point down: exit %d, status %q, want 503", code, status)
	}
	wantBody := `iapd: choosing an access point to reach f3.both.test:80 for app "browser": network is unreachable: destination "internet": policy: no usable access point (wifi: interface wifi is down; cell: interface cell is down)`
	if body != wantBody {
		t.Errorf("503 body %q\nwant %q", body, wantBody)
	}
	const curlRecvError = 56 // CURLE_RECV_ERROR: what curl 7.88 exits with on a refused CONNECT
	if out, code := bed.Curl(t, "-p", "-x", "http://127.0.0.1:3128", "-w", "%{http_connect}", "http://f4.both.test/"); code != curlRecvError || out != "503" {
		t.Errorf("http connect with every access point down: exit %d and %q, want %d and 503", code, out, curlRecvError)
	}

	wantUntouched(t, lan, accepted)
	wantLines(t, "explain with every access point down", bed.Explain(t, d, "--app", "browser", "--target", "f1.both.test:80"),
		"       unusable: interface wifi is down\n",
		"       unusable: interface cell is down\n",
		"would use: none; SOCKS5 clients get reply 3 (network unreachable) and HTTP clients 503 with:\n",
	)
}

// recreatePolicy binds the app mail to cell alone.
const recreatePolicy = `
listeners:
  - listen: "127.0.0.1:1081"
    protocol: socks5
    app: mail
apps:
  mail: {access_point: cell}
access_points:
  cell:
    interface: cell
    dns: [203.0.113.53]
    gateway: [192.0.2.1, "2001:db8:1::1"]
`

func TestPrivilegedRecreatedUplink(t *testing.T) {
	netnstest.Require(t)
	bed := testbed.New(t, testbed.Options{})
	d := bed.Start(t, recreatePolicy)
	cell := bed.Uplink("cell")
	mail := []string{"--socks5-hostname", "127.0.0.1:1081", "http://www.cell.test/"}
	if out, code := bed.Curl(t, mail...); code != 0 || out != viaCell {
		t.Fatalf("before: exit %d and %q, want exit 0 and %q", code, out, viaCell)
	}

	t0 := time.Now()
	cell.Recreate(t)
	curlUntil(t, bed, 5*time.Second, viaCell, mail...)
	// Whether iapd saw the deletion on its own depends on how the kernel's
	// messages fell into its debounce: either the interface was removed
	// and added, or it was added again under a new index.
	added := d.WaitRecord(t, time.Second, t0, "interface_added", map[string]string{"interface": "cell"})
	removed := d.Records("interface_removed", map[string]string{"interface": "cell"})
	if reason := added.Attr("reason"); !strings.HasPrefix(reason, "re-created, index ") && len(removed) == 0 {
		t.Errorf("interface added with reason %q and never removed, want it re-created under a new index", reason)
	}
	// Connections over the old interface are dead either way, so the
	// access point counts as lost and back.
	d.WaitRecord(t, time.Second, t0, "access_point_unusable", map[string]string{"access_point": "cell"})
	d.WaitRecord(t, time.Second, t0, "access_point_usable", map[string]string{"access_point": "cell"})
}
