package main

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"iapd/internal/testbed"
)

// These tests drive Debian's headless Chromium (scripts/setup-debian.sh
// installs it) inside the bed's host namespace. Each starts Chromium once,
// which loads one page. Most read the DOM that Chromium prints once the
// page loaded, but the test of the live status page drives Chromium
// through the DevTools protocol (see browserPage).

// chromiumCommand returns headless Chromium, set to run in the host
// namespace on url with the flags every test needs and then extra.
func chromiumCommand(ctx context.Context, t *testing.T, bed *testbed.Bed, url string, extra ...string) *exec.Cmd {
	t.Helper()
	path, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatalf("chromium (Debian package chromium) is needed: %v", err)
	}
	args := []string{
		"--headless", "--no-sandbox", "--disable-gpu",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--no-first-run", "--user-data-dir=" + t.TempDir(),
	}
	args = append(append(args, extra...), url)
	return bed.Host.Command(ctx, path, args...)
}

// chromium runs headless Chromium in the host namespace on url with
// extra flags, and returns the DOM it rendered once the page loaded.
func chromium(t *testing.T, bed *testbed.Bed, url string, flags ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	started := time.Now()
	cmd := chromiumCommand(ctx, t, bed, url, append([]string{"--dump-dom"}, flags...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	t.Logf("chromium %s: %v after %v", url, err, time.Since(started).Round(time.Millisecond))
	if err != nil {
		t.Fatalf("chromium: %v\nstderr:\n%s", err, stderr.String())
	}
	return stdout.String()
}

func TestPrivilegedStatusPageInChromium(t *testing.T) {
	bed, d := startService(t, testbed.StartOptions{})
	wifi := bed.Uplink("wifi")
	if _, code := bed.Curl(t, "-o", "/dev/null", "--socks5-hostname", "127.0.0.1:1080", "http://www.wifi.test/bytes?n=100000"); code != 0 {
		t.Fatalf("download: curl exit %d", code)
	}
	release := wifi.Hold()
	defer release()
	bed.StartCurl(t, "--socks5-hostname", "127.0.0.1:1080", "http://www.wifi.test/hold")
	waitUntil(t, "the download to be held", func() bool { return wifi.Holding() == 1 })
	bed.Uplink("cell").LinkDown(t)
	waitUntil(t, "cell to be unusable", func() bool {
		out, _, _ := d.CLI(t, "status")
		return strings.Contains(out, "unusable: interface cell is down")
	})

	shot := filepath.Join(testbed.ArtifactDir(t), "status-page.png")
	dom := chromium(t, bed, "http://127.0.0.1:9180/", "--screenshot="+shot, "--window-size=1280,1400")

	// Each row is matched as the page's script rendered it into the table.
	for _, row := range []struct{ what, re string }{
		{"wifi usable", `<tr data-name="wifi"><td>wifi</td><td>wifi</td><td class="usable">usable</td>`},
		{"cell down", `<tr data-name="cell"><td>cell</td><td>cell</td><td class="unusable">unusable: interface cell is down</td>`},
		{"browser goes to wifi", `<tr data-name="browser"><td>browser</td><td>wifi</td><td class="usable">wifi</td>`},
		{"mail fails over to wifi", `<tr data-name="mail"><td>mail</td><td>cell-first</td><td class="usable">wifi</td>`},
		{"destination order", `<tr data-name="cell-first"><td>cell-first</td><td>cell → wifi</td><td class="usable">wifi</td><td>mail</td></tr>`},
		{"held connection", `<td>browser</td><td>127.0.0.1:1080</td><td>www.wifi.test:80</td><td>wifi</td><td>wifi</td>`},
		{"bytes of the download", `<tr data-name="wifi"><td>wifi</td>.*?<td class="num">9[0-9.]+ KiB</td><td class="num">0</td></tr>`},
		{"listener with the held download", `<tr data-name="127.0.0.1:1080"><td>127.0.0.1:1080</td><td>127.0.0.1:1080</td><td>socks5</td><td>browser</td><td class="num">1</td><td class="num">1024</td><td class="num">0</td><td class="num">0</td></tr>`},
		{"no DNS listeners", `<td class="empty" colspan="6">no DNS listeners \(dns_listen\)</td>`},
		{"interface table", `<tr data-name="cell"><td>cell</td><td class="num">\d+</td><td class="unusable">down</td>`},
	} {
		if !regexp.MustCompile(row.re).MatchString(dom) {
			t.Errorf("the rendered page lacks %s (%s)", row.what, row.re)
		}
	}
	if !strings.Contains(dom, "policy "+d.PolicyPath) {
		t.Errorf("the rendered page does not name the policy")
	}
	if t.Failed() {
		t.Logf("rendered DOM:\n%s", dom)
	}
	t.Logf("screenshot: %s", shot)
}

func TestPrivilegedChromiumThroughSOCKS5(t *testing.T) {
	bed, _ := startService(t, testbed.StartOptions{})
	wifi, cell := bed.Uplink("wifi"), bed.Uplink("cell")

	// mail's listener leads to cell; Chromium sends the host name through
	// SOCKS5 and iapd resolves it with cell's DNS server.
	dom := chromium(t, bed, "http://www.cell.test/", "--proxy-server=socks5://127.0.0.1:1081")
	if !strings.Contains(dom, strings.TrimSuffix(viaCell, "\n")) {
		t.Errorf("Chromium rendered %q, want the page of cell (%q)", dom, viaCell)
	}
	if !cell.Queried("www.cell.test") {
		t.Errorf("cell's DNS server was not asked for www.cell.test; its log: %q", cell.Queries())
	}
	if wifi.Queried("www.cell.test") {
		t.Errorf("wifi's DNS server was asked for www.cell.test")
	}
}

func TestPrivilegedChromiumUsesPAC(t *testing.T) {
	bed, _ := startService(t, testbed.StartOptions{})

	// The PAC file sends *.cell.test to mail's listener, which leads to
	// cell; every other host would go to browser's, which leads to wifi.
	dom := chromium(t, bed, "http://www.cell.test/", "--proxy-pac-url=http://127.0.0.1:9180/proxy.pac")
	if !strings.Contains(dom, strings.TrimSuffix(viaCell, "\n")) {
		t.Errorf("Chromium rendered %q, want the page of cell (%q)", dom, viaCell)
	}
	if bed.Uplink("wifi").Queried("www.cell.test") {
		t.Errorf("wifi's DNS server was asked for www.cell.test")
	}
}

// rowText returns a JavaScript expression for the text of the row named
// name in the page's table tableID, its cells separated by tabs, or ""
// when there is no such row.
func rowText(tableID, name string) string {
	return fmt.Sprintf(`document.querySelector('#%s tr[data-name="%s"]')?.innerText ?? ""`, tableID, name)
}

// connectionsText is a JavaScript expression for the text of the page's
// table of live connections.
const connectionsText = `document.querySelector("#connections tbody").innerText`

// eventText returns a JavaScript expression for the text of the newest
// event of kind in the page's list of events, or "" when there is none.
func eventText(kind string) string {
	return fmt.Sprintf(`document.querySelector('#events li[data-kind="%s"]')?.innerText ?? ""`, kind)
}

func TestPrivilegedStatusPageFollowsEvents(t *testing.T) {
	bed, _ := startService(t, testbed.StartOptions{})
	cell := bed.Uplink("cell")
	page := openPage(t, bed, "http://127.0.0.1:9180/", "--window-size=1280,1100")
	contains := func(want string) func(string) bool {
		return func(s string) bool { return strings.Contains(s, want) }
	}

	// A reload would start the page's script again; this mark would not
	// survive it.
	page.waitFor(t, "the page to follow the event stream", `document.getElementById("stream").dataset.state`, contains("live"))
	if _, err := page.evaluate(`window.loadedOnce = true`); err != nil {
		t.Fatal(err)
	}
	page.waitFor(t, "cell usable", rowText("access-points", "cell"), contains("cell\tcell\tusable\t"))
	page.waitFor(t, "no connections", connectionsText, contains("no open connections"))

	// browser's held download over wifi shows among the live connections.
	wifi := bed.Uplink("wifi")
	release := wifi.Hold()
	defer release()
	held := bed.StartCurl(t, "--socks5-hostname", "127.0.0.1:1080", "http://www.wifi.test/hold")
	waitUntil(t, "the download to be held", func() bool { return wifi.Holding() == 1 })
	heldRow := "browser\t127.0.0.1:1080\twww.wifi.test:80\twifi\twifi\t"
	page.waitFor(t, "the held connection", connectionsText, contains(heldRow))

	// Stop the page's timers, among them its periodic refresh, so that
	// what changes from here on can only come from the event stream.
	if _, err := page.evaluate(`for (let id = setTimeout(() => {}); id > 0; id--) { clearTimeout(id); clearInterval(id); }`); err != nil {
		t.Fatal(err)
	}

	cell.LinkDown(t)
	for _, step := range []struct{ name, expr, want string }{
		{"cell unusable", rowText("access-points", "cell"), "cell\tcell\tunusable: interface cell is down\t"},
		{"mail fails over to wifi", rowText("apps", "mail"), "mail\tcell-first\twifi\t"},
		{"destination switched", rowText("destinations", "cell-first"), "cell-first\tcell → wifi\twifi\tmail"},
		{"interface down", rowText("interfaces", "cell"), "\tdown\t"},
		{"event listed", eventText("access_point_unusable"), "access_point_unusable interface=cell access_point=cell (interface cell is down)"},
		{"connection still listed", connectionsText, heldRow},
	} {
		page.waitFor(t, step.name, step.expr, contains(step.want))
	}
	shot := filepath.Join(testbed.ArtifactDir(t), "status-page-live.png")
	if err := page.screenshot(shot); err != nil {
		t.Errorf("screenshot: %v", err)
	}
	t.Logf("screenshot after cell went down: %s", shot)

	cell.LinkUp(t)
	for _, step := range []struct{ name, expr, want string }{
		{"cell usable again", rowText("access-points", "cell"), "cell\tcell\tusable\t"},
		{"mail back on cell", rowText("apps", "mail"), "mail\tcell-first\tcell\t"},
		{"interface up", rowText("interfaces", "cell"), "\tup\t"},
		{"event listed", eventText("access_point_usable"), "access_point_usable interface=cell access_point=cell"},
	} {
		page.waitFor(t, step.name, step.expr, contains(step.want))
	}

	if got, err := page.evaluate(`String(window.loadedOnce)`); err != nil || got != "true" {
		t.Errorf("the page was loaded again (mark %q, error %v), want one load", got, err)
	}
	release()
	if body, code := held.Finish(t); code != 0 || body != viaWifi+"done\n" {
		t.Errorf("the held download: curl exit %d with body %q, want 0 and %q", code, body, viaWifi+"done\n")
	}
}
