package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"testing"

	"iapd/policy"
	"iapd/proxy"
)

// listenersPolicyYAML has a listener per way of identifying the app: by
// port, and by credentials.
const listenersPolicyYAML = `
listeners:
  - listen: "127.0.0.1:0"
    protocol: socks5
    app: browser
    max_connections: 64
  - listen: "0.0.0.0:3128"
    protocol: mixed
    allow_clients: [192.0.2.0/24]
    users:
      - name: bob
        password_hash: "$2a$10$SMLPimqchhr9a9OTtRjYUeWyDApjX4g7UKFOoVgpDnvsm2m92zNFG"
        app: mail
      - name: alice
        password_hash: "$2a$10$SMLPimqchhr9a9OTtRjYUeWyDApjX4g7UKFOoVgpDnvsm2m92zNFG"
        app: browser
apps:
  browser:
    access_point: wifi
    dns_listen: "127.0.0.1:5353"
  mail:
    access_point: wifi
access_points:
  wifi:
    interface: wlan0
    dns: [192.0.2.53]
`

// indentJSON returns raw indented by two spaces per level from column 0.
func indentJSON(t *testing.T, raw json.RawMessage) string {
	t.Helper()
	var compact, out bytes.Buffer
	if err := json.Compact(&compact, raw); err != nil {
		t.Fatalf("compacting %s: %v", raw, err)
	}
	if err := json.Indent(&out, compact.Bytes(), "", "  "); err != nil {
		t.Fatalf("indenting %s: %v", raw, err)
	}
	return out.String()
}

func TestStatusListeners(t *testing.T) {
	p, err := policy.Parse("listeners.yaml", []byte(listenersPolicyYAML))
	if err != nil {
		t.Fatalf("parsing policy: %v", err)
	}
	tests := []struct {
		name          string
		d             *fakeDaemon
		wantListeners string
		wantDNS       string
	}{
		{
			name: "busy",
			d: &fakeDaemon{p: p,
				bound: map[string]OpenListener{
					"127.0.0.1:0":  {Address: "127.0.0.1:41234", Stats: proxy.ListenerStats{Connections: 3, ListenerFull: 2}},
					"0.0.0.0:3128": {Address: "0.0.0.0:3128", Stats: proxy.ListenerStats{Connections: 1, ClientsRefused: 5}},
				},
				dnsListeners: []DNSListenerStatus{{App: "browser", Listen: "127.0.0.1:5353", UDPAddress: "127.0.0.1:5353",
					TCPAddress: "127.0.0.1:5353", Queries: 12, Refused: 1, Failed: 2}},
			},
			wantListeners: `[
  {
    "listen": "127.0.0.1:0",
    "address": "127.0.0.1:41234",
    "protocol": "socks5",
    "app": "browser",
    "user_count": 0,
    "connections": 3,
    "max_connections": 64,
    "clients_refused": 0,
    "full_rejections": 2
  },
  {
    "listen": "0.0.0.0:3128",
    "address": "0.0.0.0:3128",
    "protocol": "mixed",
    "users": [
      "alice",
      "bob"
    ],
    "user_count": 2,
    "connections": 1,
    "max_connections": 1024,
    "clients_refused": 5,
    "full_rejections": 0
  }
]`,
			wantDNS: `[
  {
    "app": "browser",
    "listen": "127.0.0.1:5353",
    "udp_address": "127.0.0.1:5353",
    "tcp_address": "127.0.0.1:5353",
    "queries": 12,
    "queries_refused": 1,
    "queries_failed": 2
  }
]`,
		},
		{
			name: "no DNS listeners",
			d: &fakeDaemon{p: p, bound: map[string]OpenListener{
				"127.0.0.1:0": {Address: "127.0.0.1:41234"},
			}},
			wantListeners: `[
  {
    "listen": "127.0.0.1:0",
    "address": "127.0.0.1:41234",
    "protocol": "socks5",
    "app": "browser",
    "user_count": 0,
    "connections": 0,
    "max_connections": 64,
    "clients_refused": 0,
    "full_rejections": 0
  },
  {
    "listen": "0.0.0.0:3128",
    "address": "0.0.0.0:3128",
    "protocol": "mixed",
    "users": [
      "alice",
      "bob"
    ],
    "user_count": 2,
    "connections": 0,
    "max_connections": 1024,
    "clients_refused": 0,
    "full_rejections": 0
  }
]`,
			wantDNS: `[]`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, c, _ := startControl(t, tt.d)
			var doc struct {
				Listeners    json.RawMessage `json:"listeners"`
				DNSListeners json.RawMessage `json:"dns_listeners"`
			}
			if err := c.do(context.Background(), "GET", "/v1/status", &doc); err != nil {
				t.Fatalf("GET /v1/status: %v", err)
			}
			if got := indentJSON(t, doc.Listeners); got != tt.wantListeners {
				t.Errorf("listeners:\n%s\nwant:\n%s", got, tt.wantListeners)
			}
			if got := indentJSON(t, doc.DNSListeners); got != tt.wantDNS {
				t.Errorf("dns_listeners:\n%s\nwant:\n%s", got, tt.wantDNS)
			}
		})
	}
}
