package policy

import (
	"errors"
	"testing"
)

// splitPolicy is a corporate split tunnel: intranet names and ranges go to
// corp, a mail port is rejected, everything else uses internet.
const splitPolicy = `
listeners:
  - listen: "127.0.0.1:0"
    app: dev
apps:
  dev:
    destination: internet
    allow_override: [cell, wifi, corp-vpn, internet]
    routes:
      - domain_suffix: [corp.example, Lab.Example.]
        cidr: [198.51.100.0/24, "2001:db8:c::/48", 192.0.2.7]
        destination: corp
      - domain: [git.example.org]
        port: ["22", "9000-9100"]
        access_point: corp-vpn
      - port: 25
        reject: true
      - domain: [blocked.example]
        reject: true
  locked:
    destination: internet
    routes:
      - domain_suffix: corp.example
        destination: corp
  anything:
    access_point: wifi
    allow_override: true
access_points:
  wifi: {interface: wlan0, dns: [192.0.2.53]}
  cell: {interface: wwan0, dns: [203.0.113.53]}
  corp-vpn: {interface: tun0, dns: [198.51.100.53]}
  corp-gateway:
    interface: wlan0
    proxy: {url: "socks5://198.51.100.8:1080"}
destinations:
  internet:
    access_points: [wifi, cell]
  corp:
    access_points: [corp-gateway, corp-vpn]
`

func TestRouteMatching(t *testing.T) {
	setEnv(t, nil)
	p, err := Parse("split.yaml", []byte(splitPolicy))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	dev := p.Apps["dev"]

	tests := []struct {
		name      string
		target    string
		wantRoute int // -1 for the app's own destination
		wantDest  string
		wantErr   string
	}{
		{name: "suffix itself", target: "corp.example:443", wantRoute: 0, wantDest: "corp"},
		{name: "suffix subdomain", target: "www.corp.example:80", wantRoute: 0, wantDest: "corp"},
		{name: "suffix case and trailing dot", target: "WWW.Corp.Example.:80", wantRoute: 0, wantDest: "corp"},
		{name: "suffix written with capitals", target: "x.lab.example:80", wantRoute: 0, wantDest: "corp"},
		{name: "suffix is not a substring match", target: "notcorp.example:443", wantRoute: -1, wantDest: "internet"},
		{name: "suffix does not match parent", target: "example:443", wantRoute: -1, wantDest: "internet"},
		{name: "ipv4 in range", target: "198.51.100.20:443", wantRoute: 0, wantDest: "corp"},
		{name: "ipv4 single address", target: "192.0.2.7:443", wantRoute: 0, wantDest: "corp"},
		{name: "ipv4 next to single address", target: "192.0.2.8:443", wantRoute: -1, wantDest: "internet"},
		{name: "ipv4 mapped in ipv6 form", target: "[::ffff:198.51.100.20]:443", wantRoute: 0, wantDest: "corp"},
		{name: "ipv6 in range", target: "[2001:db8:c:1::5]:443", wantRoute: 0, wantDest: "corp"},
		{name: "ipv6 outside range", target: "[2001:db8:d::5]:443", wantRoute: -1, wantDest: "internet"},
		{name: "name that looks like a range is a name", target: "198.51.100.20.nip.example:443", wantRoute: -1, wantDest: "internet"},
		{name: "exact domain and port", target: "git.example.org:22", wantRoute: 1, wantDest: "corp-vpn"},
		{name: "exact domain port in range", target: "git.example.org:9050", wantRoute: 1, wantDest: "corp-vpn"},
		{name: "exact domain other port", target: "git.example.org:443", wantRoute: -1, wantDest: "internet"},
		{name: "exact domain no subdomains", target: "www.git.example.org:22", wantRoute: -1, wantDest: "internet"},
		{
			name: "port reject", target: "mail.example.net:25", wantRoute: 2,
			wantErr: `policy: connection not allowed: app "dev" rejects mail.example.net by routes[2] (port 25) -> reject (line 16)`,
		},
		{name: "earlier route wins over reject", target: "smtp.corp.example:25", wantRoute: 0, wantDest: "corp"},
		{
			name: "domain reject", target: "blocked.example:443", wantRoute: 3,
			wantErr: `policy: connection not allowed: app "dev" rejects blocked.example by routes[3] (domain blocked.example) -> reject (line 18)`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			plan := NewPlan(dev, tt.target, mapUsability{})
			gotRoute := -1
			if plan.Route != nil {
				gotRoute = plan.Route.Index
			}
			if gotRoute != tt.wantRoute {
				t.Errorf("route = %d, want %d", gotRoute, tt.wantRoute)
			}
			if got := plan.DestinationName(); got != tt.wantDest {
				t.Errorf("destination = %q, want %q", got, tt.wantDest)
			}
			err := plan.Err()
			if tt.wantErr == "" {
				if err != nil {
					t.Errorf("Err() = %v, want nil", err)
				}
				return
			}
			if err == nil || err.Error() != tt.wantErr {
				t.Errorf("Err() = %v, want %s", err, tt.wantErr)
			}
			if !errors.Is(err, ErrNotAllowed) {
				t.Errorf("Err() does not wrap ErrNotAllowed")
			}
			if len(plan.Candidates) != 0 {
				t.Errorf("refused plan has candidates %v", names(plan.Candidates))
			}
		})
	}
}

func TestOverridePlan(t *testing.T) {
	setEnv(t, nil)
	p, err := Parse("split.yaml", []byte(splitPolicy))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}

	tests := []struct {
		name           string
		app            string
		target         string
		choice         string
		down           mapUsability
		wantDest       string
		wantCandidates []string
		wantErr        string
	}{
		{name: "no choice", app: "dev", target: "example.com:443", wantDest: "internet", wantCandidates: []string{"wifi", "cell"}},
		{name: "access point of the destination", app: "dev", target: "example.com:443", choice: "cell", wantDest: "cell", wantCandidates: []string{"cell"}},
		{name: "access point outside the destination", app: "dev", target: "example.com:443", choice: "corp-vpn", wantDest: "corp-vpn", wantCandidates: []string{"corp-vpn"}},
		{name: "destination", app: "dev", target: "example.com:443", choice: "internet", wantDest: "internet", wantCandidates: []string{"wifi", "cell"}},
		{name: "chosen access point down", app: "dev", target: "example.com:443", choice: "cell", down: mapUsability{"cell": "interface wwan0 is down"}, wantDest: "cell",
			wantErr: `destination "cell": policy: no usable access point (cell: interface wwan0 is down)`},
		{name: "routed target narrowed to one of its access points", app: "dev", target: "www.corp.example:443", choice: "corp-vpn", wantDest: "corp-vpn", wantCandidates: []string{"corp-vpn"}},
		{name: "routed target sent elsewhere", app: "dev", target: "www.corp.example:443", choice: "cell",
			wantErr: `policy: connection not allowed: routes[0] (domain_suffix corp.example, lab.example; cidr 198.51.100.0/24, 2001:db8:c::/48, 192.0.2.7/32) -> corp sends the target to destination "corp", which does not contain "cell"`},
		{name: "not in the allowed list", app: "dev", target: "example.com:443", choice: "corp-gateway",
			wantErr: `policy: connection not allowed: app "dev" does not allow choosing "corp-gateway"`},
		{name: "unknown name", app: "dev", target: "example.com:443", choice: "nowhere",
			wantErr: `policy: connection not allowed: app "dev" does not allow choosing "nowhere"`},
		{name: "app without override", app: "locked", target: "example.com:443", choice: "cell",
			wantErr: `policy: connection not allowed: app "locked" does not allow choosing an access point ("cell"); set allow_override`},
		{name: "reject wins over choice", app: "dev", target: "mail.example.net:25", choice: "cell",
			wantErr: `policy: connection not allowed: app "dev" rejects mail.example.net by routes[2] (port 25) -> reject (line 16)`},
		{name: "allow everything", app: "anything", target: "example.com:443", choice: "corp-gateway", wantDest: "corp-gateway", wantCandidates: []string{"corp-gateway"}},
		{name: "allow everything destination", app: "anything", target: "example.com:443", choice: "corp", wantDest: "corp", wantCandidates: []string{"corp-gateway", "corp-vpn"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			down := tt.down
			if down == nil {
				down = mapUsability{}
			}
			plan := NewOverridePlan(p.Apps[tt.app], tt.target, tt.choice, down)
			if got := plan.DestinationName(); got != tt.wantDest {
				t.Errorf("destination = %q, want %q", got, tt.wantDest)
			}
			if got := names(plan.Candidates); !equalStrings(got, tt.wantCandidates) {
				t.Errorf("candidates = %v, want %v", got, tt.wantCandidates)
			}
			if plan.Choice != tt.choice {
				t.Errorf("plan choice = %q, want %q", plan.Choice, tt.choice)
			}
			err := plan.Err()
			if tt.wantErr == "" {
				if err != nil {
					t.Errorf("Err() = %v, want nil", err)
				}
				return
			}
			if err == nil || err.Error() != tt.wantErr {
				t.Errorf("Err() = %v\nwant %s", err, tt.wantErr)
			}
		})
	}
}

func TestResolvePlan(t *testing.T) {
	setEnv(t, nil)
	p, err := Parse("split.yaml", []byte(splitPolicy))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	dev := p.Apps["dev"]

	tests := []struct {
		name     string
		host     string
		wantDest string
		wantErr  bool
	}{
		{name: "routed name", host: "www.corp.example.", wantDest: "corp"},
		{name: "port condition ignored", host: "git.example.org", wantDest: "corp-vpn"},
		{name: "port-only route skipped", host: "mail.example.net", wantDest: "internet"},
		{name: "rejected name", host: "blocked.example", wantErr: true},
		{name: "other name", host: "example.com", wantDest: "internet"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			plan := NewResolvePlan(dev, tt.host, mapUsability{})
			if got := plan.DestinationName(); got != tt.wantDest {
				t.Errorf("destination = %q, want %q", got, tt.wantDest)
			}
			if got := plan.Refused() != nil; got != tt.wantErr {
				t.Errorf("refused = %v, want %v", plan.Refused(), tt.wantErr)
			}
		})
	}
}

func TestParseGatewayAndAutoDNS(t *testing.T) {
	setEnv(t, map[string]string{"IAPD_GW": "gw-secret"})
	p, err := Parse("gw.yaml", []byte(`
listeners:
  - listen: "127.0.0.1:0"
    app: dev
apps:
  dev:
    destination: corp
    dns_listen: "localhost:5353"
access_points:
  corp-gateway:
    interface: corp0
    dns: auto
    search: [corp.example.]
    proxy:
      url: "socks5://gw.corp.example:1080"
      user: alice
      password_env: IAPD_GW
  corp-http:
    interface: corp0
    proxy: {url: "http://[2001:db8::8]:3128"}
  host:
    interface: default
    dns: system
    proxy: {url: "http://127.0.0.1:3128"}
destinations:
  corp: {access_points: [corp-gateway, corp-http, host]}
`))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}

	gw := p.AccessPoints["corp-gateway"]
	if !gw.AutoDNS || len(gw.DNS) != 0 || gw.SystemDNS {
		t.Errorf("corp-gateway AutoDNS %v DNS %v SystemDNS %v, want auto with no servers", gw.AutoDNS, gw.DNS, gw.SystemDNS)
	}
	if !equalStrings(gw.Search, []string{"corp.example"}) {
		t.Errorf("corp-gateway search %v, want [corp.example]", gw.Search)
	}
	if gw.Proxy == nil {
		t.Fatal("corp-gateway has no proxy")
	}
	if got := gw.Proxy.String(); got != "socks5://alice@gw.corp.example:1080" {
		t.Errorf("proxy String() = %q", got)
	}
	if gw.Proxy.Password() != "gw-secret" || gw.Proxy.Host() != "gw.corp.example" {
		t.Errorf("proxy password %q host %q", gw.Proxy.Password(), gw.Proxy.Host())
	}
	if got := gw.Proxy.URL().String(); got != "socks5://alice:gw-secret@gw.corp.example:1080" {
		t.Errorf("proxy URL() = %q", got)
	}

	httpGW := p.AccessPoints["corp-http"].Proxy
	if httpGW == nil || httpGW.Protocol != ProxyHTTP || httpGW.Address != "[2001:db8::8]:3128" || httpGW.User != "" {
		t.Errorf("corp-http proxy = %+v, want http to [2001:db8::8]:3128 without user", httpGW)
	}
	if ap := p.AccessPoints["corp-http"]; len(ap.DNS) != 0 || ap.AutoDNS || ap.SystemDNS {
		t.Errorf("corp-http has DNS settings %v %v %v, want none", ap.DNS, ap.AutoDNS, ap.SystemDNS)
	}
	if got := p.Apps["dev"].DNSListen; got != "127.0.0.1:5353" {
		t.Errorf("dev DNSListen = %q, want 127.0.0.1:5353", got)
	}
}
