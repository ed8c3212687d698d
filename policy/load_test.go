package policy

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// goldenEnv is the environment that the golden files see.
var goldenEnv = map[string]string{
	"IAPD_TEST_PASSWORD": "test-password",
	"IAPD_EMPTY":         "",
}

// TestParseBad loads each file under testdata/bad and compares the error
// lines with the file's leading "# want: " comment lines, in order.
func TestParseBad(t *testing.T) {
	setEnv(t, goldenEnv)
	files, err := filepath.Glob("testdata/bad/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 20 {
		t.Fatalf("found %d golden files, want at least 20", len(files))
	}

	for _, file := range files {
		name := filepath.Base(file)
		t.Run(strings.TrimSuffix(name, ".yaml"), func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			want := wantLines(data)
			if len(want) == 0 {
				t.Fatalf("%s has no \"# want: \" lines", file)
			}

			p, err := Parse(name, data)
			if err == nil {
				t.Fatalf("Parse succeeded with %d listeners, want errors:\n%s", len(p.Listeners), strings.Join(want, "\n"))
			}
			if p != nil {
				t.Errorf("Parse returned a policy together with an error")
			}
			var list ErrorList
			if !errors.As(err, &list) {
				t.Fatalf("error is %T, want ErrorList: %v", err, err)
			}
			got := strings.Split(err.Error(), "\n")
			if !slices.Equal(got, want) {
				t.Errorf("errors differ\ngot:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
			if len(list) != len(want) {
				t.Errorf("ErrorList has %d entries, want %d", len(list), len(want))
			}
		})
	}
}

// wantLines returns the messages of the "# want: " lines among the
// leading comment lines of a golden file.
func wantLines(data []byte) []string {
	var want []string
	for _, line := range strings.Split(string(data), "\n") {
		if !strings.HasPrefix(line, "#") {
			break
		}
		if msg, ok := strings.CutPrefix(line, "# want: "); ok {
			want = append(want, msg)
		}
	}
	return want
}

const testHash = "$2a$10$SMLPimqchhr9a9OTtRjYUeWyDApjX4g7UKFOoVgpDnvsm2m92zNFG" // of "example-password"

// testArgon2Hash is the argon2id hash of "example-password" with salt
// "saltsaltsalt", m=4096 KiB, t=2, p=1, as printed by the reference argon2
// command (Debian package argon2 0~20171227):
// echo -n example-password | argon2 saltsaltsalt -id -t 2 -m 12 -p 1 -l 32 -e
const testArgon2Hash = "$argon2id$v=19$m=4096,t=2,p=1$c2FsdHNhbHRzYWx0$SCNG2LI4whVWL6IIRqv6rV41qS9WeIGUzMnVmuvch6w"

func TestParseGood(t *testing.T) {
	setEnv(t, map[string]string{"IAPD_BOB": "bob-password"})

	tests := []struct {
		name  string
		yaml  string
		check func(t *testing.T, p *Policy)
	}{
		{
			name: "defaults",
			yaml: `
listeners:
  - listen: "127.0.0.1:0"
    app: browser
apps:
  browser:
    access_point: wifi
access_points:
  wifi:
    interface: wlan0
    dns: [192.0.2.53]
`,
			check: func(t *testing.T, p *Policy) {
				l := p.Listeners[0]
				if l.Protocol != ProtocolMixed {
					t.Errorf("protocol = %v, want mixed", l.Protocol)
				}
				if l.Listen != "127.0.0.1:0" {
					t.Errorf("listen = %q, want 127.0.0.1:0", l.Listen)
				}
				if l.App != p.Apps["browser"] {
					t.Errorf("listener app = %v, want apps.browser", l.App)
				}
				if l.HasUsers() {
					t.Errorf("HasUsers() = true for a port listener")
				}
				want := Routing{Table: 18100, Mark: 0x1a900, RulePriority: 18100}
				if p.Routing != want {
					t.Errorf("routing = %+v, want %+v", p.Routing, want)
				}
				ap := p.AccessPoints["wifi"]
				if !slices.Equal(ap.DNSTimeouts, []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second}) {
					t.Errorf("dns timeouts = %v, want [1s 2s 4s 8s]", ap.DNSTimeouts)
				}
				if !slices.Equal(ap.DNS, []netip.AddrPort{netip.MustParseAddrPort("192.0.2.53:53")}) {
					t.Errorf("dns = %v, want [192.0.2.53:53]", ap.DNS)
				}
				if ap.SystemDNS || ap.IsDefault() {
					t.Errorf("SystemDNS = %v, IsDefault() = %v, want both false", ap.SystemDNS, ap.IsDefault())
				}
				if len(ap.Search) != 0 || len(ap.Gateways) != 0 || len(ap.Sources) != 0 {
					t.Errorf("search, gateways, sources = %v, %v, %v, want all empty", ap.Search, ap.Gateways, ap.Sources)
				}
				if ap.MaxConnections != 0 {
					t.Errorf("access point max connections = %d, want 0 (no cap)", ap.MaxConnections)
				}
				wantLimits := Limits{
					HandshakeTimeout: 10 * time.Second,
					DialTimeout:      30 * time.Second,
					IdleTimeout:      time.Hour,
					MaxHeaderBytes:   65536,
					AuthFailureDelay: 250 * time.Millisecond,
				}
				if p.Limits != wantLimits {
					t.Errorf("limits = %+v, want %+v", p.Limits, wantLimits)
				}
				if l.MaxConnections != 1024 || l.AllowClients != nil {
					t.Errorf("listener max connections %d, allow clients %v; want 1024 and nil", l.MaxConnections, l.AllowClients)
				}
				app := p.Apps["browser"]
				if app.Priority != 0 || app.MaxConnections != 0 || app.AllowLocalTargets {
					t.Errorf("app priority %d, max connections %d, allow local targets %v; want 0, 0, false", app.Priority, app.MaxConnections, app.AllowLocalTargets)
				}
			},
		},
		{
			name: "limits, caps and exposure",
			yaml: `
listeners:
  - listen: "0.0.0.0:0"
    app: browser
    max_connections: 10
    allow_clients: [192.0.2.0/24, "2001:db8::1", "::ffff:198.51.100.0/120"]
apps:
  browser:
    access_point: wifi
    priority: -5
    max_connections: 3
    allow_local_targets: true
  voip:
    access_point: wifi
    priority: 1000
access_points:
  wifi:
    interface: wlan0
    dns: [192.0.2.53]
    max_connections: 7
limits:
  handshake_timeout: 2s
  dial_timeout: 1500ms
  idle_timeout: 0
  max_header_bytes: 0x2000
  auth_failure_delay: 0s
`,
			check: func(t *testing.T, p *Policy) {
				want := Limits{HandshakeTimeout: 2 * time.Second, DialTimeout: 1500 * time.Millisecond, MaxHeaderBytes: 8192}
				if p.Limits != want {
					t.Errorf("limits = %+v, want %+v", p.Limits, want)
				}
				l := p.Listeners[0]
				wantClients := []netip.Prefix{
					netip.MustParsePrefix("192.0.2.0/24"),
					netip.MustParsePrefix("2001:db8::1/128"),
					netip.MustParsePrefix("198.51.100.0/24"),
				}
				if l.MaxConnections != 10 || !slices.Equal(l.AllowClients, wantClients) {
					t.Errorf("listener max connections %d, allow clients %v; want 10 and %v", l.MaxConnections, l.AllowClients, wantClients)
				}
				browser, voip := p.Apps["browser"], p.Apps["voip"]
				if browser.Priority != -5 || browser.MaxConnections != 3 || !browser.AllowLocalTargets {
					t.Errorf("browser priority %d, max connections %d, allow local targets %v; want -5, 3, true", browser.Priority, browser.MaxConnections, browser.AllowLocalTargets)
				}
				if voip.Priority != 1000 || voip.AllowLocalTargets {
					t.Errorf("voip priority %d, allow local targets %v; want 1000, false", voip.Priority, voip.AllowLocalTargets)
				}
				if got := p.AccessPoints["wifi"].MaxConnections; got != 7 {
					t.Errorf("wifi max connections = %d, want 7", got)
				}
			},
		},
		{
			name: "implicit destinations",
			yaml: `
listeners:
  - listen: "127.0.0.1:0"
    app: browser
apps:
  browser:
    access_point: wifi
  mail:
    access_point: wifi
  mms:
    access_point: cell
  updates:
    destination: internet
access_points:
  wifi: {interface: wlan0, dns: [192.0.2.53]}
  cell: {interface: wwan0, dns: [198.51.100.53]}
destinations:
  internet:
    access_points: [cell, wifi]
`,
			check: func(t *testing.T, p *Policy) {
				wifi := p.Apps["browser"].Destination
				if wifi == nil || wifi.Name != "wifi" || !wifi.Implicit {
					t.Fatalf("browser destination = %+v, want implicit wifi", wifi)
				}
				if !slices.Equal(wifi.AccessPoints, []*AccessPoint{p.AccessPoints["wifi"]}) {
					t.Errorf("wifi destination access points = %v, want [wifi]", wifi.AccessPoints)
				}
				if p.Apps["mail"].Destination != wifi {
					t.Errorf("mail and browser do not share the implicit destination wifi")
				}
				if p.Destinations["wifi"] != wifi {
					t.Errorf("Destinations[wifi] = %v, want the implicit destination", p.Destinations["wifi"])
				}
				cell := p.Apps["mms"].Destination
				if cell == nil || cell.Name != "cell" || !cell.Implicit {
					t.Errorf("mms destination = %+v, want implicit cell", cell)
				}
				internet := p.Apps["updates"].Destination
				if internet != p.Destinations["internet"] || internet.Implicit {
					t.Fatalf("updates destination = %+v, want explicit internet", internet)
				}
				if !slices.Equal(internet.AccessPoints, []*AccessPoint{p.AccessPoints["cell"], p.AccessPoints["wifi"]}) {
					t.Errorf("internet access points out of order: %v", names(internet.AccessPoints))
				}
				if len(p.Destinations) != 3 {
					t.Errorf("%d destinations, want 3 (wifi, cell, internet)", len(p.Destinations))
				}
			},
		},
		{
			name: "probes selection and requirements",
			yaml: `
listeners:
  - listen: "127.0.0.1:0"
    app: browser
apps:
  browser: {destination: internet}
  backup:
    destination: internet
    require: {types: [wifi, ethernet], metered: false}
  mms: {access_point: cell}
access_points:
  wifi:
    interface: wlan0
    dns: [192.0.2.53]
    probe: {http: "http://192.0.2.80/generate_204", status: 204, interval: 500ms, timeout: 300ms, failures: 2, successes: 1, dial_failures: 0}
  cell:
    interface: wwan0
    dns: [198.51.100.53]
    probe: {tcp: "check.example:443"}
  host:
    interface: default
    dns: system
    probe: {dns: example.com, interval: 1s}
interfaces:
  wlan0: {type: wifi}
  wwan0: {type: cellular, cost: 10}
  usb0: {type: cellular, metered: false}
destinations:
  internet:
    access_points: [wifi, cell, host]
    select: latency
    tolerance: 5ms
    hold_down: 0s
    on_lost: keep
    on_better: close
  racing: {access_points: [wifi, cell], select: race, race_delay: 100ms}
`,
			check: func(t *testing.T, p *Policy) {
				wantProbes := map[string]Probe{
					"wifi": {Kind: ProbeHTTP, Target: "http://192.0.2.80/generate_204", Status: 204, Interval: 500 * time.Millisecond, Timeout: 300 * time.Millisecond, Failures: 2, Successes: 1},
					"cell": {Kind: ProbeTCP, Target: "check.example:443", Status: 200, Interval: 10 * time.Second, Timeout: 2 * time.Second, Failures: 3, Successes: 2, DialFailures: 3},
					"host": {Kind: ProbeDNS, Target: "example.com", Status: 200, Interval: time.Second, Timeout: time.Second, Failures: 3, Successes: 2, DialFailures: 3},
				}
				for name, want := range wantProbes {
					if got := p.AccessPoints[name].Probe; got == nil || *got != want {
						t.Errorf("%s probe = %+v, want %+v", name, got, want)
					}
				}

				wantLinks := map[string]Link{
					"wlan0": {Interface: "wlan0", Type: LinkWifi},
					"wwan0": {Interface: "wwan0", Type: LinkCellular, Cost: 10, Metered: true},
					"usb0":  {Interface: "usb0", Type: LinkCellular},
				}
				for name, want := range wantLinks {
					if got := p.Interfaces[name]; got == nil || *got != want {
						t.Errorf("interfaces[%s] = %+v, want %+v", name, got, want)
					}
				}

				d := p.Destinations["internet"]
				if d.Select != SelectLatency || d.Tolerance != 5*time.Millisecond || d.HoldDown != 0 ||
					d.OnLost != OnLostKeep || d.OnBetter != OnBetterClose || d.RaceDelay != DefaultRaceDelay {
					t.Errorf("internet = %+v, want latency, tolerance 5ms, hold-down 0, keep on lost, close on better", d)
				}
				racing := p.Destinations["racing"]
				if racing.Select != SelectRace || racing.RaceDelay != 100*time.Millisecond || racing.HoldDown != DefaultHoldDown ||
					racing.OnLost != OnLostClose || racing.OnBetter != OnBetterKeep || racing.Tolerance != DefaultTolerance {
					t.Errorf("racing = %+v, want race with 100ms and the other defaults", racing)
				}
				implicit := p.Destinations["cell"]
				if implicit.Select != SelectPriority || implicit.HoldDown != DefaultHoldDown || implicit.RaceDelay != DefaultRaceDelay {
					t.Errorf("implicit destination cell = %+v, want the default rules", implicit)
				}

				req := p.Apps["backup"].Require
				if !slices.Equal(req.Types, []LinkType{LinkWifi, LinkEthernet}) || req.Metered == nil || *req.Metered {
					t.Errorf("backup requirement = %+v, want types wifi, ethernet and unmetered", req)
				}
				if !p.Apps["browser"].Require.IsZero() {
					t.Errorf("browser requirement = %+v, want none", p.Apps["browser"].Require)
				}
			},
		},
		{
			name: "dns servers ports and zones",
			yaml: `
listeners:
  - listen: ":0"
    protocol: socks5
    app: browser
    allow_clients: [192.0.2.0/24]
apps:
  browser:
    access_point: wifi
access_points:
  wifi:
    interface: wlan0
    dns: [192.0.2.53, "2001:db8::53", "192.0.2.54:5353", "[2001:db8::55]:5300", "fe80::1", "fe80::2%wlan0", "[fe80::3]:5353"]
    search: [corp.example., lab.example]
    dns_timeouts: [500ms, 3s]
    gateway: ["2001:db8::1", 192.0.2.1]
    source: [192.0.2.10]
  host:
    interface: default
    dns: system
`,
			check: func(t *testing.T, p *Policy) {
				wifi := p.AccessPoints["wifi"]
				want := []netip.AddrPort{
					netip.MustParseAddrPort("192.0.2.53:53"),
					netip.MustParseAddrPort("[2001:db8::53]:53"),
					netip.MustParseAddrPort("192.0.2.54:5353"),
					netip.MustParseAddrPort("[2001:db8::55]:5300"),
					netip.MustParseAddrPort("[fe80::1%wlan0]:53"),
					netip.MustParseAddrPort("[fe80::2%wlan0]:53"),
					netip.MustParseAddrPort("[fe80::3%wlan0]:5353"),
				}
				if !slices.Equal(wifi.DNS, want) {
					t.Errorf("dns = %v\nwant %v", wifi.DNS, want)
				}
				if !slices.Equal(wifi.Search, []string{"corp.example", "lab.example"}) {
					t.Errorf("search = %v, want [corp.example lab.example]", wifi.Search)
				}
				if !slices.Equal(wifi.DNSTimeouts, []time.Duration{500 * time.Millisecond, 3 * time.Second}) {
					t.Errorf("dns timeouts = %v, want [500ms 3s]", wifi.DNSTimeouts)
				}
				if gw, ok := wifi.Gateway(false); !ok || gw != netip.MustParseAddr("192.0.2.1") {
					t.Errorf("Gateway(IPv4) = %v, %v, want 192.0.2.1", gw, ok)
				}
				if gw, ok := wifi.Gateway(true); !ok || gw != netip.MustParseAddr("2001:db8::1") {
					t.Errorf("Gateway(IPv6) = %v, %v, want 2001:db8::1", gw, ok)
				}
				if src, ok := wifi.Source(false); !ok || src != netip.MustParseAddr("192.0.2.10") {
					t.Errorf("Source(IPv4) = %v, %v, want 192.0.2.10", src, ok)
				}
				if src, ok := wifi.Source(true); ok {
					t.Errorf("Source(IPv6) = %v, want none", src)
				}

				host := p.AccessPoints["host"]
				if !host.SystemDNS || !host.IsDefault() || len(host.DNS) != 0 {
					t.Errorf("host: SystemDNS = %v, IsDefault() = %v, dns = %v; want true, true, none", host.SystemDNS, host.IsDefault(), host.DNS)
				}
				if p.Listeners[0].Protocol != ProtocolSOCKS5 {
					t.Errorf("protocol = %v, want socks5", p.Listeners[0].Protocol)
				}
			},
		},
		{
			name: "access point order and routing",
			yaml: `
listeners:
  - listen: "127.0.0.1:0"
    app: browser
apps:
  browser:
    access_point: zeta
access_points:
  zeta: {interface: eth0, dns: [192.0.2.53]}
  alpha: {interface: eth1, dns: [192.0.2.53]}
  mid: {interface: default, dns: system}
routing:
  table: 256
  mark: 0xff00
  priority: 100
`,
			check: func(t *testing.T, p *Policy) {
				if got := names(p.AccessPointOrder); !slices.Equal(got, []string{"zeta", "alpha", "mid"}) {
					t.Errorf("access point order = %v, want [zeta alpha mid]", got)
				}
				for i, ap := range p.AccessPointOrder {
					if ap.Index != i {
						t.Errorf("%s.Index = %d, want %d", ap.Name, ap.Index, i)
					}
					if p.AccessPoints[ap.Name] != ap {
						t.Errorf("AccessPoints[%s] is not the access point in AccessPointOrder", ap.Name)
					}
				}
				want := Routing{Table: 256, Mark: 0xff00, RulePriority: 100}
				if p.Routing != want {
					t.Errorf("routing = %+v, want %+v", p.Routing, want)
				}
			},
		},
		{
			name: "users with bcrypt and env passwords",
			yaml: `
listeners:
  - listen: "127.0.0.1:0"
    protocol: http
    users:
      - name: alice
        password_hash: "` + testHash + `"
        app: mail
      - name: bob
        password_env: IAPD_BOB
        app: browser
apps:
  browser: {access_point: host}
  mail: {access_point: host}
access_points:
  host: {interface: default, dns: system}
`,
			check: func(t *testing.T, p *Policy) {
				l := p.Listeners[0]
				if l.App != nil || !l.HasUsers() || len(l.Users) != 2 {
					t.Fatalf("listener: app %v, %d users; want no app, 2 users", l.App, len(l.Users))
				}
				alice, bob := l.Users["alice"], l.Users["bob"]
				if alice.Name != "alice" || alice.App != p.Apps["mail"] {
					t.Errorf("alice = %q with app %v, want app mail", alice.Name, alice.App)
				}
				if string(alice.secret.bcrypt) != testHash || alice.secret.plain != nil {
					t.Errorf("alice's secret is not the bcrypt hash")
				}
				if bob.App != p.Apps["browser"] {
					t.Errorf("bob's app = %v, want browser", bob.App)
				}
				if string(bob.secret.plain) != "bob-password" || bob.secret.isHashed() {
					t.Errorf("bob's secret is not the value of IAPD_BOB")
				}
			},
		},
		{
			name: "argon2id user",
			yaml: `
listeners:
  - listen: "127.0.0.1:0"
    users:
      - name: carol
        password_hash: "` + testArgon2Hash + `"
        app: mail
apps:
  mail: {access_point: host}
access_points:
  host: {interface: default, dns: system}
`,
			check: func(t *testing.T, p *Policy) {
				carol := p.Listeners[0].Users["carol"]
				h := carol.secret.argon2
				if h == nil || h.memory != 4096 || h.time != 2 || h.threads != 1 || string(h.salt) != "saltsaltsalt" || len(h.key) != 32 {
					t.Fatalf("carol's argon2id hash = %+v, want m=4096 t=2 p=1, salt saltsaltsalt, 32-byte key", h)
				}
				if !carol.CheckPassword("example-password") {
					t.Errorf("CheckPassword(example-password) = false, want true")
				}
				if carol.CheckPassword("example-passwore") {
					t.Errorf("CheckPassword(example-passwore) = true, want false")
				}
				if p.Listeners[0].unknownUserSecret() != carol.secret {
					t.Errorf("unknown users are not checked against carol's argon2id secret")
				}
			},
		},
		{
			name: "aliases and empty optional maps",
			yaml: `
listeners:
  - listen: "[::1]:0"
    app: browser
  - listen: "localhost:0"
    app: browser
apps:
  browser: {access_point: wifi}
access_points:
  wifi: &bound
    interface: wlan0
    dns: &servers [192.0.2.53, 192.0.2.54]
  wifi2:
    interface: wlan1
    dns: *servers
destinations:
routing:
`,
			check: func(t *testing.T, p *Policy) {
				if !slices.Equal(p.AccessPoints["wifi2"].DNS, p.AccessPoints["wifi"].DNS) {
					t.Errorf("aliased dns = %v, want %v", p.AccessPoints["wifi2"].DNS, p.AccessPoints["wifi"].DNS)
				}
				if len(p.Listeners) != 2 {
					t.Errorf("%d listeners, want 2", len(p.Listeners))
				}
				if p.Routing.Table != 18100 {
					t.Errorf("routing table = %d, want the default 18100", p.Routing.Table)
				}
			},
		},
	}

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := []byte(tt.yaml)
			p, err := Parse("test.yaml", data)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if p.Path != "test.yaml" {
				t.Errorf("Path = %q, want test.yaml", p.Path)
			}
			sum := sha256.Sum256(data)
			if p.Hash != hex.EncodeToString(sum[:]) {
				t.Errorf("Hash = %s, want the SHA-256 of the file", p.Hash)
			}
			tt.check(t, p)
		})
	}
}

func names(aps []*AccessPoint) []string {
	var out []string
	for _, ap := range aps {
		out = append(out, ap.Name)
	}
	return out
}

func TestLoadExampleConfig(t *testing.T) {
	setEnv(t, nil)
	p, err := Load("../config.example.yaml")
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if len(p.Listeners) != 3 {
		t.Errorf("%d listeners, want 3", len(p.Listeners))
	}
	alice := p.Listeners[1].Users["alice"]
	if alice == nil || !alice.CheckPassword("example-password") {
		t.Errorf("alice's password is not example-password, as the comment says")
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "none.yaml"))
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("error = %v, want one wrapping fs.ErrNotExist", err)
	}
	if err != nil && !strings.HasPrefix(err.Error(), "reading policy: open ") {
		t.Errorf("error = %q, want it to start with \"reading policy: open \"", err)
	}
}

func TestErrorFormat(t *testing.T) {
	cause := errors.New("bad input")
	tests := []struct {
		name string
		err  *Error
		want string
	}{
		{"full", &Error{File: "iapd.yaml", Line: 14, Column: 7, Path: "apps.mms.access_point", Msg: `no access point named "mobile"`}, `iapd.yaml:14:7: apps.mms.access_point: no access point named "mobile"`},
		{"no path", &Error{File: "iapd.yaml", Line: 1, Column: 1, Msg: "missing apps"}, "iapd.yaml:1:1: missing apps"},
		{"no column", &Error{File: "iapd.yaml", Line: 3, Msg: "invalid YAML", Err: cause}, "iapd.yaml:3: invalid YAML: bad input"},
		{"no line", &Error{File: "iapd.yaml", Err: cause}, "iapd.yaml: bad input"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.err.Error(); got != tt.want {
				t.Errorf("Error() = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestErrorListUnwrap(t *testing.T) {
	setEnv(t, goldenEnv)
	_, err := Parse("p.yaml", []byte("listeners: []\napps: {}\naccess_points:\n  x: {interface: eth0, dns: [192.0.2.53]}\nrouting: {mark: 0}\n"))
	var first *Error
	if !errors.As(err, &first) {
		t.Fatalf("errors.As(*Error) failed on %v", err)
	}
	if first.Line != 1 || first.Column != 12 || first.Path != "listeners" {
		t.Errorf("first error at %d:%d %s, want 1:12 listeners", first.Line, first.Column, first.Path)
	}
	var list ErrorList
	if !errors.As(err, &list) || len(list) != 2 {
		t.Fatalf("want an ErrorList of 2, got %v", err)
	}
	if list[1].Path != "routing.mark" {
		t.Errorf("second error path = %q, want routing.mark", list[1].Path)
	}
}

func TestErrorCause(t *testing.T) {
	setEnv(t, goldenEnv)
	_, err := Parse("p.yaml", []byte(`
listeners:
  - listen: "127.0.0.1:0"
    users: [{name: a, password_hash: "$2a$99$SMLPimqchhr9a9OTtRjYUeWyDApjX4g7UKFOoVgpDnvsm2m92zNFG", app: b}]
apps: {b: {access_point: h}}
access_points: {h: {interface: default, dns: system}}
`))
	var list ErrorList
	if !errors.As(err, &list) || len(list) != 1 {
		t.Fatalf("want one error, got %v", err)
	}
	cause := list[0].Unwrap()
	if cause == nil || !strings.Contains(cause.Error(), "cost 99") {
		t.Errorf("Unwrap() = %v, want bcrypt's cost error", cause)
	}
}

func TestSnippet(t *testing.T) {
	src := []byte("a: 1\n\tb: x\nnäme: [wlan0]\r\nlast")
	tests := []struct {
		name string
		err  *Error
		want string
	}{
		{"caret under column", &Error{Line: 1, Column: 4}, "a: 1\n   ^"},
		{"tab kept", &Error{Line: 2, Column: 5}, "\tb: x\n\t   ^"},
		{"characters not bytes", &Error{Line: 3, Column: 7}, "näme: [wlan0]\n      ^"},
		{"last line", &Error{Line: 4, Column: 1}, "last\n^"},
		{"no column", &Error{Line: 1}, "a: 1"},
		{"line past end", &Error{Line: 9, Column: 1}, ""},
		{"no line", &Error{}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.err.Snippet(src); got != tt.want {
				t.Errorf("Snippet() = %q, want %q", got, tt.want)
			}
		})
	}
}

// TestSnippetOfParseError checks that a position from Parse points at the
// offending value.
func TestSnippetOfParseError(t *testing.T) {
	setEnv(t, goldenEnv)
	src := []byte("listeners:\n  - listen: \"127.0.0.1:0\"\n    app: mms\napps:\n  mms:\n    access_point: mobile\naccess_points: {}\n")
	_, err := Parse("iapd.yaml", src)
	var list ErrorList
	if !errors.As(err, &list) || len(list) != 1 {
		t.Fatalf("want one error, got %v", err)
	}
	want := "    access_point: mobile\n                  ^"
	if got := list[0].Snippet(src); got != want {
		t.Errorf("Snippet() =\n%s\nwant\n%s", got, want)
	}
	if got := list[0].Error(); got != `iapd.yaml:6:19: apps.mms.access_point: no access point named "mobile"` {
		t.Errorf("Error() = %q", got)
	}
}

// checkInvariants fails t when a policy that Parse accepted breaks a rule
// that the proxy relies on.
func checkInvariants(t *testing.T, p *Policy) {
	t.Helper()
	for i, l := range p.Listeners {
		if (l.App == nil) == !l.HasUsers() {
			t.Fatalf("listeners[%d] has app %v and %d users, want exactly one of them", i, l.App, len(l.Users))
		}
		if l.MaxConnections < 1 {
			t.Fatalf("listeners[%d].MaxConnections = %d", i, l.MaxConnections)
		}
		host, _, _ := net.SplitHostPort(l.Listen)
		addr, err := netip.ParseAddr(host)
		loopback := host == "localhost" || err == nil && addr.IsLoopback()
		if !loopback && !l.HasUsers() && l.AllowClients == nil {
			t.Fatalf("listeners[%d] on %s serves anyone without credentials", i, l.Listen)
		}
		for name, u := range l.Users {
			if u.App == nil || u.secret == nil {
				t.Fatalf("listeners[%d].users %s has app %v, secret %v", i, name, u.App, u.secret)
			}
		}
	}
	for name, app := range p.Apps {
		if app.Destination == nil || len(app.Destination.AccessPoints) == 0 {
			t.Fatalf("app %s has no access points", name)
		}
	}
	if p.Limits.HandshakeTimeout <= 0 || p.Limits.DialTimeout <= 0 || p.Limits.MaxHeaderBytes <= 0 || p.Limits.IdleTimeout < 0 {
		t.Fatalf("limits %+v out of range", p.Limits)
	}
}

// FuzzParse checks that no input makes Parse panic, and that it returns
// either a policy that keeps the proxy's invariants or an ErrorList. The
// golden files seed it.
func FuzzParse(f *testing.F) {
	files, _ := filepath.Glob("testdata/bad/*.yaml")
	files = append(files, "../config.example.yaml")
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	setEnv(f, goldenEnv)

	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse("fuzz.yaml", data)
		if err == nil {
			if p == nil {
				t.Fatal("Parse returned neither a policy nor an error")
			}
			checkInvariants(t, p)
			return
		}
		var list ErrorList
		if !errors.As(err, &list) || len(list) == 0 {
			t.Fatalf("error is %T, want a non-empty ErrorList: %v", err, err)
		}
		for _, e := range list {
			_ = e.Snippet(data)
		}
	})
}

// TestLoadReadmeFailoverPolicy parses the Wi-Fi with cellular failover
// policy that README.md shows, so that the example stays valid.
func TestLoadReadmeFailoverPolicy(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(readme), "## Wi-Fi with cellular failover")
	if !ok {
		t.Fatal("README.md has no section \"Wi-Fi with cellular failover\"")
	}
	_, block, ok := strings.Cut(section, "```yaml\n")
	if !ok {
		t.Fatal("the section has no yaml block")
	}
	block, _, _ = strings.Cut(block, "```")

	p, err := Parse("README.md", []byte(block))
	if err != nil {
		t.Fatalf("README policy: %v", err)
	}
	d := p.Destinations["laptop"]
	if d == nil || len(d.AccessPoints) != 2 || d.HoldDown != 5*time.Second {
		t.Fatalf("destination laptop = %+v, want wifi and cell with a 5s hold-down", d)
	}
	if got := p.Link("wwan0"); !got.Metered || got.Cost != 10 {
		t.Errorf("wwan0 = %+v, want metered with cost 10", got)
	}
	if p.AccessPoints["wifi"].Probe == nil || p.AccessPoints["cell"].Probe == nil {
		t.Error("the access points lack their probes")
	}
}
