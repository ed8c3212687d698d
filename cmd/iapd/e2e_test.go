package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"iapd/internal/netnstest"
	"iapd/internal/testbed"
)

// These tests run the iapd binary in a test bed (see package testbed).
// Uplinks wifi and cell use the same addresses, and the host's default route
// leads to wifi. Each uplink's web server responds with its own name and the
// client address it saw. curl is the client throughout.

func TestMain(m *testing.M) {
	os.Exit(testbed.Main(m))
}

// Credentials of the apps that identify themselves. The password of mms
// reaches iapd through an environment variable, the one of ota as a bcrypt
// hash made at test time.
const (
	mmsPasswordEnv = "IAPD_E2E_MMS_PASSWORD"
	mmsPassword    = "mms-secret"
	otaPassword    = "ota-secret"
)

// e2ePolicy is the policy of the tests: apps identified by listener port
// (browser on wifi, mail on cell, web on wifi over HTTP, updates on the
// destination cell-first) and by credentials (mms over SOCKS5, ota over
// HTTP, both on cell). @OTA_HASH@ is replaced by ota's password hash.
const e2ePolicy = `
listeners:
  - listen: "127.0.0.1:1080"
    protocol: socks5
    app: browser
  - listen: "127.0.0.1:1081"
    protocol: socks5
    app: mail
  - listen: "127.0.0.1:1082"
    protocol: socks5
    users:
      - name: mms
        password_env: ` + mmsPasswordEnv + `
        app: mms
  - listen: "127.0.0.1:3128"
    protocol: http
    users:
      - name: ota
        password_hash: "@OTA_HASH@"
        app: ota
  - listen: "127.0.0.1:3129"
    protocol: http
    app: web
  - listen: "127.0.0.1:8080"
    protocol: mixed
    app: updates
apps:
  browser:
    access_point: wifi
  web:
    access_point: wifi
  mail:
    access_point: cell
  mms:
    access_point: cell
  ota:
    access_point: cell
  updates:
    destination: cell-first
access_points:
  wifi:
    interface: wifi
    dns: [203.0.113.53]
  cell:
    interface: cell
    dns: [203.0.113.53]
    gateway: [192.0.2.1, "2001:db8:1::1"]
destinations:
  cell-first:
    access_points: [cell, wifi]
    # These tests are about binding, not fail-back: go back at once.
    hold_down: 0s
`

var otaHash = sync.OnceValue(func() string {
	// The lowest cost keeps the test fast, and iapd checks hashes of any cost.
	h, err := bcrypt.GenerateFromPassword([]byte(otaPassword), bcrypt.MinCost)
	if err != nil {
		panic("hashing ota's password: " + err.Error())
	}
	return string(h)
})

// startE2E builds a bed and starts iapd in it with e2ePolicy.
func startE2E(t *testing.T) *testbed.Bed {
	t.Helper()
	netnstest.Require(t)
	bed := testbed.New(t, testbed.Options{})
	bed.Start(t, strings.ReplaceAll(e2ePolicy, "@OTA_HASH@", otaHash()), mmsPasswordEnv+"="+mmsPassword)
	return bed
}

// curlCase is one curl run through iapd and the body it must print.
type curlCase struct {
	name string
	args []string
	want string
}

func runCurlCases(t *testing.T, bed *testbed.Bed, tests []curlCase) {
	t.Helper()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, code := bed.Curl(t, tt.args...)
			if code != 0 {
				t.Fatalf("curl exit code %d, want 0", code)
			}
			if out != tt.want {
				t.Errorf("body %q, want %q", out, tt.want)
			}
		})
	}
}

const (
	viaWifi   = "uplink=wifi client=192.0.2.2\n"
	viaCell   = "uplink=cell client=192.0.2.2\n"
	viaWifiV6 = "uplink=wifi client=2001:db8:1::2\n"
	viaCellV6 = "uplink=cell client=2001:db8:1::2\n"
)

func TestPrivilegedAppByListener(t *testing.T) {
	bed := startE2E(t)
	runCurlCases(t, bed, []curlCase{
		{name: "socks5 browser to wifi", args: []string{"--socks5", "127.0.0.1:1080", "http://203.0.113.10/"}, want: viaWifi},
		{name: "socks5 mail to cell", args: []string{"--socks5", "127.0.0.1:1081", "http://203.0.113.10/"}, want: viaCell},
		{name: "socks5 hostname to wifi", args: []string{"--socks5-hostname", "127.0.0.1:1080", "http://www.wifi.test/"}, want: viaWifi},
		{name: "http get to wifi", args: []string{"-x", "http://127.0.0.1:3129", "http://www.wifi.test/"}, want: viaWifi},
		{name: "http connect to wifi", args: []string{"-p", "-x", "http://127.0.0.1:3129", "http://www.wifi.test/"}, want: viaWifi},
		{name: "mixed as socks5", args: []string{"--socks5-hostname", "127.0.0.1:8080", "http://www.cell.test/"}, want: viaCell},
		{name: "mixed as http get", args: []string{"-x", "http://127.0.0.1:8080", "http://www.cell.test/"}, want: viaCell},
		{name: "mixed as http connect", args: []string{"-p", "-x", "http://127.0.0.1:8080", "http://www.cell.test/"}, want: viaCell},
	})
}

// TestPrivilegedNameResolvedByOwnDNS checks that a name which every uplink
// resolves is sent only to the DNS server of the app's access point.
func TestPrivilegedNameResolvedByOwnDNS(t *testing.T) {
	bed := startE2E(t)
	wifi, cell := bed.Uplink("wifi"), bed.Uplink("cell")
	tests := []struct {
		name     string
		proxy    string
		want     string
		asked    *testbed.Uplink
		notAsked *testbed.Uplink
	}{
		{name: "browser asks wifi", proxy: "127.0.0.1:1080", want: viaWifi, asked: wifi, notAsked: cell},
		{name: "mail asks cell", proxy: "127.0.0.1:1081", want: viaCell, asked: cell, notAsked: wifi},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wifi.ResetQueries()
			cell.ResetQueries()
			out, code := bed.Curl(t, "--socks5-hostname", tt.proxy, "http://both.test/")
			if code != 0 || out != tt.want {
				t.Fatalf("curl: exit %d and body %q, want exit 0 and %q", code, out, tt.want)
			}
			if !tt.asked.Queried("both.test") {
				t.Errorf("%s's DNS server was not asked for both.test; its log: %q", tt.asked.Name, tt.asked.Queries())
			}
			if q := tt.notAsked.Queries(); len(q) != 0 {
				t.Errorf("%s's DNS server was asked %q, want nothing", tt.notAsked.Name, q)
			}
		})
	}
}

func TestPrivilegedAppByCredentials(t *testing.T) {
	bed := startE2E(t)
	wifi, cell := bed.Uplink("wifi"), bed.Uplink("cell")
	tests := []curlCase{
		{name: "socks5 user mms", args: []string{"-x", "socks5h://mms:" + mmsPassword + "@127.0.0.1:1082", "http://www.cell.test/"}},
		{name: "http get user ota", args: []string{"-x", "http://ota:" + otaPassword + "@127.0.0.1:3128", "http://www.cell.test/"}},
		{name: "http connect user ota", args: []string{"-p", "-x", "http://ota:" + otaPassword + "@127.0.0.1:3128", "http://www.cell.test/"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, code := bed.Curl(t, tt.args...)
			if code != 0 {
				t.Fatalf("curl exit code %d, want 0", code)
			}
			if out != viaCell {
				t.Errorf("body %q, want %q", out, viaCell)
			}
			if wifi.Queried("www.cell.test") {
				t.Errorf("wifi's DNS server was asked for www.cell.test; its log: %q", wifi.Queries())
			}
		})
	}

	// iapd caches answers for their TTL, so only the first case has to
	// reach cell's server. Only that server has the name, so every body
	// above that says uplink=cell came through cell's resolver.
	if !cell.Queried("www.cell.test") {
		t.Errorf("cell's DNS server was not asked for www.cell.test; its log: %q", cell.Queries())
	}
}

func TestPrivilegedWrongCredentialsRefused(t *testing.T) {
	bed := startE2E(t)
	wifi, cell := bed.Uplink("wifi"), bed.Uplink("cell")
	const (
		curlProxyError = 97 // CURLE_PROXY: the SOCKS5 handshake failed
		curlRecvError  = 56 // CURLE_RECV_ERROR: what curl 7.88 exits with on a refused CONNECT
	)
	tests := []struct {
		name string
		args []string
		code int
		out  string // with -w, the status curl saw
	}{
		{name: "socks5 wrong password", args: []string{"-x", "socks5h://mms:wrong@127.0.0.1:1082"}, code: curlProxyError},
		{name: "socks5 unknown user", args: []string{"-x", "socks5h://nobody:" + mmsPassword + "@127.0.0.1:1082"}, code: curlProxyError},
		{name: "socks5 no credentials", args: []string{"-x", "socks5h://127.0.0.1:1082"}, code: curlProxyError},
		{name: "http get wrong password", args: []string{"-x", "http://ota:wrong@127.0.0.1:3128", "-w", "%{http_code}", "-o", "/dev/null"}, out: "407"},
		{name: "http get no credentials", args: []string{"-x", "http://127.0.0.1:3128", "-w", "%{http_code}", "-o", "/dev/null"}, out: "407"},
		{name: "http connect wrong password", args: []string{"-p", "-x", "http://ota:wrong@127.0.0.1:3128", "-w", "%{http_connect}", "-o", "/dev/null"}, code: curlRecvError, out: "407"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wifi.ResetQueries()
			cell.ResetQueries()
			wifiAccepted, cellAccepted := wifi.Accepted(), cell.Accepted()

			out, code := bed.Curl(t, append(tt.args, "http://www.cell.test/")...)
			if code != tt.code {
				t.Errorf("curl exit code %d, want %d", code, tt.code)
			}
			if out != tt.out {
				t.Errorf("curl output %q, want %q", out, tt.out)
			}
			if n := wifi.Accepted() - wifiAccepted; n != 0 {
				t.Errorf("wifi's web server accepted %d connections, want 0", n)
			}
			if n := cell.Accepted() - cellAccepted; n != 0 {
				t.Errorf("cell's web server accepted %d connections, want 0", n)
			}
			if q := append(wifi.Queries(), cell.Queries()...); len(q) != 0 {
				t.Errorf("DNS servers were asked %q, want nothing", q)
			}
		})
	}
}

func TestPrivilegedIPv6Target(t *testing.T) {
	bed := startE2E(t)
	runCurlCases(t, bed, []curlCase{
		{name: "name with only AAAA via cell", args: []string{"--socks5-hostname", "127.0.0.1:1081", "http://v6.cell.test/"}, want: viaCellV6},
		{name: "literal via cell", args: []string{"--socks5", "127.0.0.1:1081", "http://[2001:db8:ff::10]/"}, want: viaCellV6},
		{name: "literal via cell over http connect", args: []string{"-p", "-x", "http://ota:" + otaPassword + "@127.0.0.1:3128", "http://[2001:db8:ff::10]/"}, want: viaCellV6},
		// wifi has no gateway in the policy, so iapd takes the one of the
		// system's default route.
		{name: "literal via wifi", args: []string{"--socks5", "127.0.0.1:1080", "http://[2001:db8:ff::10]/"}, want: viaWifiV6},
	})
}

func TestPrivilegedFailoverWhenLinkDown(t *testing.T) {
	bed := startE2E(t)
	cell := bed.Uplink("cell")
	args := []string{"--socks5-hostname", "127.0.0.1:8080", "http://both.test/"}

	out, code := bed.Curl(t, args...)
	if code != 0 || out != viaCell {
		t.Fatalf("with both links up: exit %d and body %q, want exit 0 and %q", code, out, viaCell)
	}

	cell.LinkDown(t)
	out, code = bed.Curl(t, args...)
	if code != 0 || out != viaWifi {
		t.Fatalf("with cell down: exit %d and body %q, want exit 0 and %q", code, out, viaWifi)
	}

	// A link that comes back must carry its access point's connections
	// again; iapd has to restore the routes the kernel dropped with it.
	cell.LinkUp(t)
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, code = bed.Curl(t, args...)
		if code == 0 && out == viaCell {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("5 s after cell came back: exit %d and body %q, want exit 0 and %q", code, out, viaCell)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestPrivilegedRefusesWithoutCapability runs iapd as root without one
// capability that binding to an interface needs. iapd must name the
// capability and the access point that needs it, and must not start.
func TestPrivilegedRefusesWithoutCapability(t *testing.T) {
	netnstest.Require(t)
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Fatalf("setpriv (Debian package util-linux) is needed: %v", err)
	}
	bed := testbed.New(t, testbed.Options{})
	path := testbed.WritePolicy(t, `
listeners:
  - listen: "127.0.0.1:1080"
    protocol: socks5
    app: mail
apps:
  mail:
    access_point: mobile
access_points:
  mobile:
    interface: cell
    dns: [203.0.113.53]
`)

	tests := []struct {
		name string
		drop string // capability, as setpriv names it
		want string
	}{
		{name: "no CAP_NET_ADMIN", drop: "net_admin", want: "CAP_NET_ADMIN"},
		{name: "no CAP_NET_RAW", drop: "net_raw", want: "CAP_NET_RAW"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			// Root keeps only the capabilities of its bounding set across
			// exec, so iapd starts without the dropped one.
			cmd := bed.Host.Command(ctx, setpriv, "--inh-caps=-all", "--bounding-set=-"+tt.drop,
				testbed.Binary(t), "run", "-c", path)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			t.Logf("iapd without %s: %v\n%s", tt.want, err, stderr.String())

			var exitErr *exec.ExitError
			if !errors.As(err, &exitErr) || exitErr.ExitCode() <= 0 {
				t.Fatalf("iapd without %s: %v, want a non-zero exit status", tt.want, err)
			}
			if !strings.Contains(stderr.String(), tt.want) {
				t.Errorf("iapd's output does not name %s", tt.want)
			}
			if !strings.Contains(stderr.String(), "mobile") {
				t.Errorf("iapd's output does not name the access point mobile")
			}
			if strings.Contains(stderr.String(), "msg=ready") {
				t.Errorf("iapd logged that it was ready")
			}
			for _, left := range bed.Leftovers(t) {
				t.Errorf("iapd left behind: %s", left)
			}
		})
	}
}

func TestValidateReportsPositions(t *testing.T) {
	bin := testbed.Binary(t)
	valid := testbed.WritePolicy(t, strings.ReplaceAll(e2ePolicy, "@OTA_HASH@", otaHash()))
	bad, err := filepath.Abs(filepath.Join("testdata", "e2e", "bad.yaml"))
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name   string
		args   []string
		env    string
		code   int
		stdout string
		lines  []string // lines of standard error that must appear, in this order
	}{
		{
			name:   "valid policy",
			args:   []string{"validate", "-c", valid},
			env:    mmsPasswordEnv + "=" + mmsPassword,
			stdout: valid + ": ok\n",
		},
		{
			name: "every problem with its position",
			args: []string{"validate", "-c", bad},
			code: 1,
			lines: []string{
				bad + `:3:15: listeners[0].protocol: invalid protocol "socks6": must be socks5, http or mixed`,
				bad + `:7:19: apps.browser.access_point: no access point named "mobile"`,
				bad + `:12:5: access_points.wifi.gatway: unknown key, did you mean gateway?`,
			},
		},
		{
			name: "unset password variable",
			args: []string{"validate", "-c", valid},
			code: 1,
			lines: []string{
				valid + `:13:23: listeners[2].users[0].password_env: environment variable ` + mmsPasswordEnv + ` is not set`,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(bin, tt.args...)
			cmd.Env = withoutVariable(os.Environ(), mmsPasswordEnv)
			if tt.env != "" {
				cmd.Env = append(cmd.Env, tt.env)
			}
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			t.Logf("iapd %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(tt.args, " "), err, stdout.String(), stderr.String())

			if code := cmd.ProcessState.ExitCode(); code != tt.code {
				t.Errorf("exit code %d, want %d", code, tt.code)
			}
			if stdout.String() != tt.stdout {
				t.Errorf("stdout %q, want %q", stdout.String(), tt.stdout)
			}
			rest := stderr.String()
			for _, want := range tt.lines {
				i := indexLinePrefix(rest, want)
				if i < 0 {
					t.Errorf("stderr lacks a line starting %q (in order)", want)
					continue
				}
				rest = rest[i+len(want):]
			}
			if tt.code == 0 && stderr.Len() != 0 {
				t.Errorf("stderr %q, want empty", stderr.String())
			}
		})
	}
}

func TestVersionPrints(t *testing.T) {
	out, err := exec.Command(testbed.Binary(t), "version").Output()
	if err != nil {
		t.Fatalf("iapd version: %v", err)
	}
	if !regexp.MustCompile(`^iapd \S+`).Match(out) {
		t.Errorf("iapd version printed %q, want \"iapd VERSION ...\"", out)
	}
}

// indexLinePrefix returns the index in s of the first line that starts with
// prefix, or -1.
func indexLinePrefix(s, prefix string) int {
	for i := 0; i < len(s); {
		if strings.HasPrefix(s[i:], prefix) {
			return i
		}
		nl := strings.IndexByte(s[i:], '\n')
		if nl < 0 {
			break
		}
		i += nl + 1
	}
	return -1
}

func withoutVariable(env []string, name string) []string {
	out := env[:0:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, name+"=") {
			out = append(out, kv)
		}
	}
	return out
}
