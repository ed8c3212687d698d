package cli

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"iapd/dns"
	"iapd/policy"
)

// explainPolicy has a laptop app on Wi-Fi with cellular failover and a
// backup app that must not use metered access points.
const explainPolicy = `
listeners:
  - listen: "127.0.0.1:0"
    app: laptop
apps:
  laptop: {destination: internet}
  backup:
    destination: internet
    require: {types: [wifi, ethernet], metered: false}
access_points:
  wifi:
    interface: wlan-test0
    dns: [192.0.2.53]
    probe: {http: "http://192.0.2.80/generate_204", status: 204, interval: 5s}
  cell:
    interface: wwan-test0
    dns: [198.51.100.53]
interfaces:
  wlan-test0: {type: wifi}
  wwan-test0: {type: cellular, cost: 10}
destinations:
  internet:
    access_points: [wifi, cell]
    select: cost
`

// mapConditions is policy.Conditions over a table of statuses.
type mapConditions map[string]policy.Status

func (m mapConditions) Status(ap *policy.AccessPoint) policy.Status { return m[ap.Name] }
func (m mapConditions) Now() time.Time                              { return time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC) }
func (m mapConditions) Current(*policy.Destination) *policy.AccessPoint {
	return nil
}
func (m mapConditions) Turn(*policy.Destination) uint64 { return 0 }

func TestWriteExplanation(t *testing.T) {
	pol, err := policy.Parse("explain.yaml", []byte(explainPolicy))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	wifiLink := policy.Link{Interface: "wlan-test0", Type: policy.LinkWifi}
	cellLink := policy.Link{Interface: "wwan-test0", Type: policy.LinkCellular, Cost: 10, Metered: true}
	probe := "http http://192.0.2.80/generate_204 every 5s: "
	now := mapConditions{}.Now()

	tests := []struct {
		name  string
		app   string
		state mapConditions
		want  string
	}{
		{
			name: "both usable",
			app:  "laptop",
			state: mapConditions{
				"wifi": {Usable: true, IPv4: true, Link: wifiLink, Probe: probe + "passed, 12ms", Latency: 12 * time.Millisecond},
				"cell": {Usable: true, IPv4: true, Link: cellLink},
			},
			want: `app:         laptop
target:      www.example.com:443 (not dialled)
route:       none matches; the app's destination applies
destination: internet
rules:       select cost, hold-down 5s, on_lost close, on_better keep

access points, in the destination's order:
  1. wifi: interface wlan-test0 (wifi, cost 0, unmetered)
       usable
       probe: http http://192.0.2.80/generate_204 every 5s: passed, 12ms
       dns: 192.0.2.53:53 from the policy
  2. cell: interface wwan-test0 (cellular, cost 10, metered)
       usable
       dns: 198.51.100.53:53 from the policy

would use: wifi, lowest cost (0)
then:      cell
`,
		},
		{
			name: "probe failing moves to cell",
			app:  "laptop",
			state: mapConditions{
				"wifi": {Reason: "probe failed: context deadline exceeded", IPv4: true, Link: wifiLink, Probe: probe + "failed 3 times in a row: context deadline exceeded"},
				"cell": {Usable: true, IPv4: true, Link: cellLink},
			},
			want: `app:         laptop
target:      www.example.com:443 (not dialled)
route:       none matches; the app's destination applies
destination: internet
rules:       select cost, hold-down 5s, on_lost close, on_better keep

access points, in the destination's order:
  1. wifi: interface wlan-test0 (wifi, cost 0, unmetered)
       unusable: probe failed: context deadline exceeded
       probe: http http://192.0.2.80/generate_204 every 5s: failed 3 times in a row: context deadline exceeded
       dns: 192.0.2.53:53 from the policy
  2. cell: interface wwan-test0 (cellular, cost 10, metered)
       usable
       dns: 198.51.100.53:53 from the policy

would use: cell, lowest cost (10)
`,
		},
		{
			name: "held down and filtered by requirement",
			app:  "backup",
			state: mapConditions{
				"wifi": {Usable: true, IPv4: true, Link: wifiLink, Since: now.Add(-2 * time.Second), Probe: probe + "passed, 12ms"},
				"cell": {Usable: true, IPv4: true, Link: cellLink},
			},
			want: `app:         backup
target:      www.example.com:443 (not dialled)
route:       none matches; the app's destination applies
destination: internet
rules:       select cost, hold-down 5s, on_lost close, on_better keep
requires:    type wifi or ethernet, unmetered

access points, in the destination's order:
  1. wifi: interface wlan-test0 (wifi, cost 0, unmetered)
       usable, held down until 12:00:03
       probe: http http://192.0.2.80/generate_204 every 5s: passed, 12ms
       dns: 192.0.2.53:53 from the policy
  2. cell: interface wwan-test0 (cellular, cost 10, metered)
       usable, but left out: interface wwan-test0 is cellular, and the app requires wifi or ethernet
       dns: 198.51.100.53:53 from the policy

would use: wifi, lowest cost (0); it came back 2s ago and is held down for 5s, but nothing else is usable
`,
		},
		{
			name: "nothing usable",
			app:  "backup",
			state: mapConditions{
				"wifi": {Reason: "interface wlan-test0 is down", Link: wifiLink, Probe: probe + "paused while the link is unusable"},
				"cell": {Usable: true, IPv4: true, Link: cellLink},
			},
			want: `app:         backup
target:      www.example.com:443 (not dialled)
route:       none matches; the app's destination applies
destination: internet
rules:       select cost, hold-down 5s, on_lost close, on_better keep
requires:    type wifi or ethernet, unmetered

access points, in the destination's order:
  1. wifi: interface wlan-test0 (wifi, cost 0, unmetered)
       unusable: interface wlan-test0 is down
       probe: http http://192.0.2.80/generate_204 every 5s: paused while the link is unusable
       dns: 192.0.2.53:53 from the policy
  2. cell: interface wwan-test0 (cellular, cost 10, metered)
       usable, but left out: interface wwan-test0 is cellular, and the app requires wifi or ethernet
       dns: 198.51.100.53:53 from the policy

would use: none; SOCKS5 clients get reply 3 (network unreachable) and HTTP clients 503 with:
  destination "internet": policy: no usable access point (wifi: interface wlan-test0 is down; cell: interface wwan-test0 is cellular, and the app requires wifi or ethernet)
`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			plan := policy.NewPlan(pol.Apps[tt.app], "www.example.com:443", tt.state)
			writeExplain(t.Context(), &out, plan, "www.example.com:443", tt.state, dns.DiscoverConfig{})
			if out.String() != tt.want {
				t.Errorf("explanation:\n%s\nwant:\n%s", out.String(), tt.want)
			}
		})
	}
}

func TestExplainCommand(t *testing.T) {
	path := filepath.Join(t.TempDir(), "iapd.yaml")
	if err := os.WriteFile(path, []byte(explainPolicy), 0o600); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name    string
		args    []string
		wantErr string
		usage   bool
		want    []string // lines of standard output, in order
	}{
		{
			name:    "interfaces missing on this host",
			args:    []string{"-c", path, "--app", "laptop", "--target", "www.example.com:443"},
			wantErr: errSilent.Error(), // exit 1: the connection would be refused
			want: []string{
				"       unusable: interface wlan-test0 not found",
				"       probe: http http://192.0.2.80/generate_204 every 5s: not sent; add -probe to send it once",
				"       unusable: interface wwan-test0 not found",
				"would use: none; SOCKS5 clients get reply 3 (network unreachable) and HTTP clients 503 with:",
			},
		},
		{name: "no app", args: []string{"-c", path, "--target", "www.example.com:443"}, usage: true, wantErr: "explain needs -app and -target"},
		{name: "unknown app", args: []string{"-c", path, "--app", "mail", "--target", "www.example.com:443"}, usage: true, wantErr: `no app named "mail" in ` + path + "; apps: backup, laptop"},
		{name: "target without port", args: []string{"-c", path, "--app", "laptop", "--target", "www.example.com"}, usage: true, wantErr: `invalid -target "www.example.com": want host:port with a port from 1 to 65535, like example.com:443`},
		{name: "target port zero", args: []string{"-c", path, "--app", "laptop", "--target", "www.example.com:0"}, usage: true, wantErr: `invalid -target "www.example.com:0": want host:port with a port from 1 to 65535, like example.com:443`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			err := explainPolicyCommand(tt.args, &stdout, &stderr)
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Fatalf("error = %v, want %s", err, tt.wantErr)
				}
				var ue usageError
				if errors.As(err, &ue) != tt.usage {
					t.Errorf("usage error = %v, want %v", !tt.usage, tt.usage)
				}
				if tt.want == nil {
					return
				}
			} else if err != nil {
				t.Fatalf("explain: %v\n%s", err, stderr.String())
			}
			rest := stdout.String()
			for _, line := range tt.want {
				i := strings.Index(rest, line+"\n")
				if i < 0 {
					t.Fatalf("output lacks %q (in order):\n%s", line, stdout.String())
				}
				rest = rest[i+len(line):]
			}
		})
	}
}
