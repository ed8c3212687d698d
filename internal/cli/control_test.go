package cli

import (
	"bytes"
	"testing"

	"iapd/admin"
)

func TestPrintStatus(t *testing.T) {
	proxyListeners := []admin.ListenerStatus{
		{Listen: "127.0.0.1:0", Address: "127.0.0.1:41234", Protocol: "socks5", App: "browser",
			Connections: 3, MaxConnections: 64, FullRejections: 2},
		{Listen: "0.0.0.0:3128", Address: "0.0.0.0:3128", Protocol: "mixed", Users: []string{"alice", "bob"}, UserCount: 2,
			Connections: 1, MaxConnections: 1024, ClientsRefused: 5},
	}
	doc := func(dns []admin.DNSListenerStatus) *statusDocument {
		return &statusDocument{
			Status: &admin.Status{
				Version: "1.2.3", PID: 4242, UptimeSeconds: 3725,
				Policy:       admin.PolicyStatus{Path: "/etc/iapd/iapd.yaml", Hash: "0123456789abcdef0123"},
				Listeners:    proxyListeners,
				DNSListeners: dns,
				Connections:  4,
			},
			AccessPoints: []admin.AccessPointStatus{
				{Name: "wifi", Interface: "wlan0", Device: "wlan0", Usable: true, Connections: 4, Total: 9, BytesUp: 2048, BytesDown: 3 << 20},
			},
			Destinations: []admin.DestinationStatus{{Name: "wifi", Implicit: true, AccessPoints: []string{"wifi"}, Current: "wifi", Apps: []string{"browser", "mail"}}},
			Apps: []admin.AppStatus{
				{Name: "browser", Destination: "wifi", Connections: 3, BytesUp: 1024, BytesDown: 2 << 20},
				{Name: "mail", Destination: "wifi", Connections: 1, BytesUp: 1024, BytesDown: 1 << 20},
			},
		}
	}
	const head = `iapd 1.2.3, pid 4242, up 1h02m
policy /etc/iapd/iapd.yaml (sha256 0123456789ab)
4 open connection(s)

LISTENER      ADDRESS          PROTOCOL  APP        OPEN  MAX   REFUSED  FULL
127.0.0.1:0   127.0.0.1:41234  socks5    browser    3     64    0        2
0.0.0.0:3128  0.0.0.0:3128     mixed     users (2)  1     1024  5        0
`
	const tail = `
ACCESS POINT  INTERFACE  STATE   LATENCY  OPEN  TOTAL  UP      DOWN    DIAL FAILURES
wifi          wlan0      usable  -        4     9      2.0KiB  3.0MiB  0

DESTINATION  ACCESS POINTS  NOW   APPS
wifi         wifi           wifi  browser,mail

APP      DESTINATION  OPEN  UP      DOWN
browser  wifi         3     1.0KiB  2.0MiB
mail     wifi         1     1.0KiB  1.0MiB
`
	tests := []struct {
		name string
		dns  []admin.DNSListenerStatus
		want string
	}{
		{name: "no DNS listeners", want: head + tail},
		{
			name: "DNS listeners",
			dns: []admin.DNSListenerStatus{
				{App: "browser", Listen: "127.0.0.1:5353", UDPAddress: "127.0.0.1:5353", TCPAddress: "127.0.0.1:5353", Queries: 12, Refused: 1, Failed: 2},
				{App: "mail", Listen: "[::1]:5354", UDPAddress: "[::1]:5354", TCPAddress: "[::1]:5355", Queries: 7},
			},
			want: head + `
DNS LISTENER    ADDRESS                         APP      QUERIES  REFUSED  FAILED
127.0.0.1:5353  127.0.0.1:5353                  browser  12       1        2
[::1]:5354      udp [::1]:5354, tcp [::1]:5355  mail     7        0        0
` + tail,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			printStatus(&out, doc(tt.dns))
			if got := out.String(); got != tt.want {
				t.Errorf("printStatus wrote:\n%s\nwant:\n%s", got, tt.want)
			}
		})
	}
}
