package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"iapd/admin"
	"iapd/internal/netnstest"
	"iapd/internal/testbed"
)

// servicePolicy is the policy of the tests of iapd as a service: browser on
// wifi and mail on cell, identified by port, with the HTTP listener for
// metrics, the status page and the PAC file. @BROWSER_AP@ is replaced by
// the access point of browser.
const servicePolicy = `
listeners:
  - listen: "127.0.0.1:1080"
    protocol: socks5
    app: browser
  - listen: "127.0.0.1:1081"
    protocol: mixed
    app: mail
apps:
  browser:
    access_point: @BROWSER_AP@
  mail:
    destination: cell-first
access_points:
  wifi:
    interface: wifi
    dns: [203.0.113.53]
  cell:
    interface: cell
    dns: [203.0.113.53]
    gateway: [192.0.2.1]
destinations:
  cell-first:
    access_points: [cell, wifi]
    # Go back to cell at once: the default hold-down of 5 s equals the
    # tests' wait and made the fail-back checks race with it.
    hold_down: 0s
control:
  http: 127.0.0.1:9180
  pac:
    - hosts: ["*.cell.test"]
      app: mail
    - hosts: ["*"]
      app: browser
`

func serviceYAML(browserAP string) string {
	return strings.ReplaceAll(servicePolicy, "@BROWSER_AP@", browserAP)
}

func startService(t *testing.T, opts testbed.StartOptions) (*testbed.Bed, *testbed.Iapd) {
	t.Helper()
	netnstest.Require(t)
	bed := testbed.New(t, testbed.Options{})
	return bed, bed.StartWith(t, serviceYAML("wifi"), opts)
}

// waitUntil polls cond every 20 ms until it holds or five seconds pass.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// eventLines follows "iapd events" in the background and collects its
// lines.
type eventLines struct {
	mu    sync.Mutex
	lines []string
	cmd   *exec.Cmd
	done  chan struct{}
}

func followEvents(t *testing.T, d *testbed.Iapd, args ...string) *eventLines {
	t.Helper()
	e := &eventLines{done: make(chan struct{})}
	e.cmd = exec.Command(testbed.Binary(t), append([]string{"events", "-socket", d.Socket}, args...)...)
	out, err := e.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	e.cmd.Stderr = os.Stderr
	if err := e.cmd.Start(); err != nil {
		t.Fatalf("starting iapd events: %v", err)
	}
	go func() {
		defer close(e.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			t.Logf("iapd events: %s", sc.Text())
			e.mu.Lock()
			e.lines = append(e.lines, sc.Text())
			e.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		e.cmd.Process.Signal(syscall.SIGTERM)
		<-e.done
		e.cmd.Wait()
	})
	// The stream is open once the subscriber shows in the bus; a short
	// poll of a line that any event would write is not possible before an
	// event, so wait for the command's connection instead.
	waitUntil(t, "iapd events to subscribe", func() bool { return subscribers(t, d) > 0 })
	return e
}

// subscribers counts the open event streams of d, read from its log.
func subscribers(t *testing.T, d *testbed.Iapd) int {
	t.Helper()
	return strings.Count(d.Logs(), `"msg":"event stream opened"`)
}

// waitLine waits until a collected line matches re.
func (e *eventLines) waitLine(t *testing.T, re string) string {
	t.Helper()
	pattern := regexp.MustCompile(re)
	var found string
	waitUntil(t, "an event line matching "+re, func() bool {
		e.mu.Lock()
		defer e.mu.Unlock()
		for _, line := range e.lines {
			if pattern.MatchString(line) {
				found = line
				return true
			}
		}
		return false
	})
	return found
}

// statusOf returns the status part of "iapd status -json".
func statusOf(t *testing.T, d *testbed.Iapd) admin.Status {
	t.Helper()
	out, stderr, code := d.CLI(t, "status", "-json")
	var doc struct {
		Status admin.Status `json:"status"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil || code != 0 {
		t.Fatalf("iapd status -json: exit %d, stderr %q: %v", code, stderr, err)
	}
	return doc.Status
}

func TestPrivilegedControlCommands(t *testing.T) {
	bed, d := startService(t, testbed.StartOptions{})
	wifi := bed.Uplink("wifi")

	// status, as a table and as JSON.
	out, _, code := d.CLI(t, "status")
	if code != 0 {
		t.Fatalf("iapd status exit %d, want 0", code)
	}
	if !strings.Contains(out, "policy "+d.PolicyPath+" (sha256 ") {
		t.Errorf("iapd status does not name the policy")
	}
	for _, row := range []string{
		`127\.0\.0\.1:1080\s+127\.0\.0\.1:1080\s+socks5\s+browser\s+0\s+1024\s+0\s+0$`,
		`127\.0\.0\.1:1081\s+127\.0\.0\.1:1081\s+mixed\s+mail\s+0\s+1024\s+0\s+0$`,
		`wifi\s+wifi\s+usable\s`,
		`cell-first\s+cell,wifi\s+cell\s+mail`,
	} {
		if !regexp.MustCompile(`(?m)^` + row).MatchString(out) {
			t.Errorf("iapd status lacks a row matching %s", row)
		}
	}
	if strings.Contains(out, "DNS LISTENER") {
		t.Errorf("iapd status lists DNS listeners of a policy without dns_listen")
	}
	out, _, _ = d.CLI(t, "status", "-json")
	var doc struct {
		Status       admin.Status              `json:"status"`
		AccessPoints []admin.AccessPointStatus `json:"access_points"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("iapd status -json: %v", err)
	}
	if doc.Status.Policy.Path != d.PolicyPath || len(doc.AccessPoints) != 2 {
		t.Errorf("iapd status -json = %+v", doc)
	}
	wantListeners := []admin.ListenerStatus{
		{Listen: "127.0.0.1:1080", Address: "127.0.0.1:1080", Protocol: "socks5", App: "browser", MaxConnections: 1024},
		{Listen: "127.0.0.1:1081", Address: "127.0.0.1:1081", Protocol: "mixed", App: "mail", MaxConnections: 1024},
	}
	if got := doc.Status.Listeners; !reflect.DeepEqual(got, wantListeners) {
		t.Errorf("iapd status -json listeners = %+v, want %+v", got, wantListeners)
	}
	if got := doc.Status.DNSListeners; got == nil || len(got) != 0 {
		t.Errorf("iapd status -json dns_listeners = %#v, want []", got)
	}

	// A held download shows in conns, and closing it ends curl's transfer.
	release := wifi.Hold()
	defer release()
	held := bed.StartCurl(t, "--socks5-hostname", "127.0.0.1:1080", "http://www.wifi.test/hold")
	waitUntil(t, "the download to be held", func() bool { return wifi.Holding() == 1 })
	out, _, code = d.CLI(t, "conns", "-json")
	var conns []admin.Conn
	if err := json.Unmarshal([]byte(out), &conns); err != nil || code != 0 {
		t.Fatalf("iapd conns -json: exit %d, %v", code, err)
	}
	if len(conns) != 1 {
		t.Fatalf("iapd conns lists %d connections, want 1", len(conns))
	}
	// The held download is a client of browser's listener.
	if got := statusOf(t, d).Listeners[0]; got.Connections != 1 {
		t.Errorf("browser's listener with a download held has %d connection(s), want 1", got.Connections)
	}
	c := conns[0]
	if c.App != "browser" || c.AccessPoint != "wifi" || c.Interface != "wifi" || c.Listener != "127.0.0.1:1080" || c.Target != "www.wifi.test:80" {
		t.Errorf("connection %+v, want app browser over wifi from 127.0.0.1:1080 to www.wifi.test:80", c)
	}
	out, _, _ = d.CLI(t, "conns")
	if !regexp.MustCompile(`(?m)^` + strconv.FormatUint(c.ID, 10) + `\s+browser\s+127\.0\.0\.1:1080\s+www\.wifi\.test:80\s+wifi\s+wifi\s`).MatchString(out) {
		t.Errorf("iapd conns does not list the connection as a table row")
	}
	if _, stderr, code := d.CLI(t, "conns", "-close", "999999"); code != 1 || !strings.Contains(stderr, "no open connection with ID 999999") {
		t.Errorf("closing an unknown ID: exit %d, stderr %q; want 1 and a message naming the ID", code, stderr)
	}
	if out, _, code := d.CLI(t, "conns", "-close", strconv.FormatUint(c.ID, 10)); code != 0 || out != "closed connection "+strconv.FormatUint(c.ID, 10)+"\n" {
		t.Errorf("iapd conns -close: exit %d, output %q", code, out)
	}
	if body, code := held.Finish(t); code == 0 || strings.Contains(body, "done") {
		t.Errorf("the closed download: curl exit %d with body %q, want a failure before done", code, body)
	}

	// explain, wait and events follow the link.
	out, _, code = d.CLI(t, "explain", "-app", "mail", "-target", "www.cell.test:80")
	if code != 0 || !strings.Contains(out, "a new connection goes through cell now") {
		t.Errorf("iapd explain: exit %d, output %q", code, out)
	}
	events := followEvents(t, d)
	wifi.LinkDown(t)
	events.waitLine(t, `interface_down interface=wifi reason="administratively down"`)
	events.waitLine(t, `access_point_unusable interface=wifi access_point=wifi reason="interface wifi is down"`)

	out, _, code = d.CLI(t, "explain", "-app", "browser", "-target", "www.wifi.test:80")
	if code != 1 || !regexp.MustCompile(`(?m)^-\s+wifi\s+wifi\s+unusable: interface wifi is down$`).MatchString(out) {
		t.Errorf("iapd explain with wifi down: exit %d, output %q; want exit 1 and wifi unusable", code, out)
	}
	if _, stderr, code := d.CLI(t, "wait", "-access-point", "wifi", "-timeout", "300ms"); code != 4 || !strings.Contains(stderr, "access point wifi not usable within 300ms") {
		t.Errorf("iapd wait on a down link: exit %d, stderr %q; want 4", code, stderr)
	}
	waiting := exec.Command(testbed.Binary(t), "wait", "-socket", d.Socket, "-access-point", "wifi", "-timeout", "20s")
	var waitOut bytes.Buffer
	waiting.Stdout = &waitOut
	if err := waiting.Start(); err != nil {
		t.Fatal(err)
	}
	wifi.LinkUp(t)
	if err := waiting.Wait(); err != nil || waitOut.String() != "usable\n" {
		t.Errorf("iapd wait while the link came up: %v, output %q; want exit 0 and usable", err, waitOut.String())
	}
	events.waitLine(t, `access_point_usable interface=wifi access_point=wifi`)

	// Errors scripts tell apart by exit code.
	if _, _, code := d.CLI(t, "wait", "-destination", "nowhere", "-timeout", "1s"); code != 1 {
		t.Errorf("iapd wait on an unknown destination: exit %d, want 1", code)
	}
	stopped := exec.Command(testbed.Binary(t), "status", "-socket", t.TempDir()+"/none.sock")
	if err := stopped.Run(); stopped.ProcessState.ExitCode() != 3 {
		t.Errorf("iapd status without a daemon: %v, want exit status 3", err)
	}
}

func TestPrivilegedReloadKeepsOpenDownload(t *testing.T) {
	bed, d := startService(t, testbed.StartOptions{})
	wifi := bed.Uplink("wifi")
	release := wifi.Hold()
	defer release()

	held := bed.StartCurl(t, "--socks5-hostname", "127.0.0.1:1080", "http://www.wifi.test/hold")
	waitUntil(t, "the download to be held", func() bool { return wifi.Holding() == 1 })

	// browser moves to cell, listener 1081 goes and 1082 comes.
	next := strings.Replace(serviceYAML("cell"), `"127.0.0.1:1081"`, `"127.0.0.1:1082"`, 1)
	if err := os.WriteFile(d.PolicyPath, []byte(next), 0o600); err != nil {
		t.Fatal(err)
	}
	out, _, code := d.CLI(t, "reload")
	if code != 0 || !strings.Contains(out, "changed): listeners 1 kept, 1 added, 1 removed; 0 connection(s) closed") {
		t.Fatalf("iapd reload: exit %d, output %q", code, out)
	}

	runCurlCases(t, bed, []curlCase{
		{name: "new connections follow the new policy", args: []string{"--socks5-hostname", "127.0.0.1:1080", "http://both.test/"}, want: viaCell},
		{name: "added listener serves", args: []string{"--socks5-hostname", "127.0.0.1:1082", "http://both.test/"}, want: viaCell},
	})
	if _, code := bed.Curl(t, "--socks5-hostname", "127.0.0.1:1081", "http://both.test/"); code != 7 {
		t.Errorf("curl through the removed listener: exit %d, want 7 (connection refused)", code)
	}

	release()
	body, code := held.Finish(t)
	if code != 0 || body != viaWifi+"done\n" {
		t.Errorf("the download open across the reload: curl exit %d, body %q; want exit 0 and %q", code, body, viaWifi+"done\n")
	}
}

func TestPrivilegedReloadRejectsBadPolicy(t *testing.T) {
	bed, d := startService(t, testbed.StartOptions{})
	before, _, _ := d.CLI(t, "status", "-json")
	events := followEvents(t, d, "-json")

	bad := strings.Replace(serviceYAML("mobile"), "protocol: socks5", "protocol: socks6", 1)
	if err := os.WriteFile(d.PolicyPath, []byte(bad), 0o600); err != nil {
		t.Fatal(err)
	}
	_, stderr, code := d.CLI(t, "reload")
	if code != 1 {
		t.Errorf("iapd reload of a bad policy: exit %d, want 1", code)
	}
	for _, want := range []string{
		d.PolicyPath + `:4:15: listeners[0].protocol: invalid protocol "socks6": must be socks5, http or mixed`,
		"    protocol: socks6\n              ^",
		d.PolicyPath + `:11:19: apps.browser.access_point: no access point named "mobile"`,
		"iapd: policy rejected with 2 problem(s); iapd keeps serving the policy it had",
	} {
		if !strings.Contains(stderr, want) {
			t.Errorf("iapd reload stderr lacks %q", want)
		}
	}
	events.waitLine(t, `"kind":"policy_rejected"`)

	// SIGHUP reports the same through the log and the events.
	d.Signal(t, syscall.SIGHUP)
	waitUntil(t, "the SIGHUP reload to be rejected", func() bool {
		return strings.Count(d.Logs(), `"msg":"policy rejected; serving the previous one"`) == 2
	})

	after, _, _ := d.CLI(t, "status", "-json")
	var b, a struct {
		Status admin.Status `json:"status"`
	}
	json.Unmarshal([]byte(before), &b)
	json.Unmarshal([]byte(after), &a)
	if a.Status.Policy.Hash == "" || a.Status.Policy.Hash != b.Status.Policy.Hash {
		t.Errorf("policy hash %q after the rejected reload, want the old %q", a.Status.Policy.Hash, b.Status.Policy.Hash)
	}
	runCurlCases(t, bed, []curlCase{
		{name: "old policy still serves", args: []string{"--socks5-hostname", "127.0.0.1:1080", "http://both.test/"}, want: viaWifi},
	})
}

// metricValue returns the value of the sample of name with exactly the
// given labels, in Prometheus text format, and whether there is one.
func metricValue(text, name, labels string) (float64, bool) {
	for _, line := range strings.Split(text, "\n") {
		rest, ok := strings.CutPrefix(line, name+"{"+labels+"} ")
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(rest, 64)
		return v, err == nil
	}
	return 0, false
}

func TestPrivilegedMetricsCountTransfer(t *testing.T) {
	bed, _ := startService(t, testbed.StartOptions{})
	const size = 1 << 20
	body, code := bed.Curl(t, "-o", "/dev/null", "-w", "%{size_download}", "--socks5-hostname", "127.0.0.1:1080", "http://www.wifi.test/bytes?n="+strconv.Itoa(size))
	if code != 0 {
		t.Fatalf("download: curl exit %d", code)
	}
	downloaded, _ := strconv.Atoi(body)

	metrics, code := bed.Curl(t, "http://127.0.0.1:9180/metrics")
	if code != 0 {
		t.Fatalf("scrape: curl exit %d", code)
	}
	// The relay counts the whole HTTP response: the body and its headers.
	down, ok := metricValue(metrics, "iapd_bytes_total", `access_point="wifi",app="browser",direction="down"`)
	if !ok || down < float64(downloaded) || down > float64(downloaded)+1024 {
		t.Errorf("bytes down for browser over wifi = %v (found %v), want the %d bytes downloaded plus headers", down, ok, downloaded)
	}
	up, _ := metricValue(metrics, "iapd_bytes_total", `access_point="wifi",app="browser",direction="up"`)
	if up <= 0 || up > 1024 {
		t.Errorf("bytes up for browser over wifi = %v, want the size of one request", up)
	}
	if n, _ := metricValue(metrics, "iapd_connections_total", `access_point="wifi",app="browser"`); n != 1 {
		t.Errorf("connections of browser over wifi = %v, want 1", n)
	}
	if _, ok := metricValue(metrics, "iapd_bytes_total", `access_point="cell",app="browser",direction="down"`); ok {
		t.Errorf("browser has bytes counted on cell")
	}
	for _, want := range []struct{ name, labels string }{
		{"iapd_access_point_usable", `access_point="wifi",interface="wifi"`},
		{"iapd_destination_access_point", `access_point="cell",destination="cell-first"`},
		{"iapd_dns_lookups_total", `access_point="wifi",result="ok"`},
		{"iapd_dial_duration_seconds_count", `access_point="wifi"`},
	} {
		if v, ok := metricValue(metrics, want.name, want.labels); !ok || v < 1 {
			t.Errorf("%s{%s} = %v (found %v), want at least 1", want.name, want.labels, v, ok)
		}
	}

	// A refused dial counts by reason: cell has no server on port 81.
	bed.Curl(t, "--socks5-hostname", "127.0.0.1:1081", "http://www.cell.test:81/")
	metrics, _ = bed.Curl(t, "http://127.0.0.1:9180/metrics")
	if v, ok := metricValue(metrics, "iapd_dial_errors_total", `access_point="cell",app="mail",reason="refused"`); !ok || v != 1 {
		t.Errorf("refused dials of mail over cell = %v (found %v), want 1", v, ok)
	}

	// The HTTP listener refuses a Host header that is a name, against DNS
	// rebinding.
	out, _ := bed.Curl(t, "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: attacker.example", "http://127.0.0.1:9180/v1/status")
	if out != "421" {
		t.Errorf("request with Host attacker.example: status %s, want 421", out)
	}
	out, _ = bed.Curl(t, "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "http://127.0.0.1:9180/v1/reload")
	if out != "403" {
		t.Errorf("reload over the HTTP listener: status %s, want 403", out)
	}
}

func TestPrivilegedSIGTERMDrains(t *testing.T) {
	tests := []struct {
		name     string
		drain    string
		release  bool // the held download finishes during the drain
		wantBody string
	}{
		{name: "download finishes within the drain", drain: "10s", release: true, wantBody: viaWifi + "done\n"},
		{name: "drain timeout closes the download", drain: "500ms", wantBody: viaWifi},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bed, d := startService(t, testbed.StartOptions{Args: []string{"--drain-timeout", tt.drain}})
			wifi := bed.Uplink("wifi")
			release := wifi.Hold()
			defer release()
			held := bed.StartCurl(t, "--socks5-hostname", "127.0.0.1:1080", "http://www.wifi.test/hold")
			waitUntil(t, "the download to be held", func() bool { return wifi.Holding() == 1 })

			stopped := make(chan error, 1)
			go func() {
				_, err := d.Stop(t, 15*time.Second)
				stopped <- err
			}()
			waitUntil(t, "iapd to stop accepting", func() bool {
				_, code := bed.Curl(t, "--socks5-hostname", "127.0.0.1:1080", "http://both.test/")
				return code == 7
			})
			if tt.release {
				release()
			}

			if err := <-stopped; err != nil {
				t.Errorf("iapd after SIGTERM: %v, want exit status 0", err)
			}
			body, code := held.Finish(t)
			if body != tt.wantBody {
				t.Errorf("held download: curl exit %d, body %q; want %q", code, body, tt.wantBody)
			}
			if tt.release && code != 0 {
				t.Errorf("held download: curl exit %d, want 0", code)
			}
			if left := bed.Leftovers(t); len(left) != 0 {
				t.Errorf("iapd left routing state behind: %q", left)
			}
			if _, err := os.Stat(d.Socket); !os.IsNotExist(err) {
				t.Errorf("control socket still there after exit: %v", err)
			}
			logs := d.Logs()
			for _, msg := range []string{`"msg":"draining connections"`, `"msg":"removed routing tables and rules"`, `"msg":"stopped"`} {
				if !strings.Contains(logs, msg) {
					t.Errorf("iapd's log lacks %s", msg)
				}
			}
		})
	}
}
