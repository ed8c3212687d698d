package policy

import (
	"slices"
	"testing"
)

func TestParseControl(t *testing.T) {
	const base = `
listeners:
  - listen: "127.0.0.1:1080"
    protocol: socks5
    app: browser
  - listen: "127.0.0.1:1081"
    protocol: http
    app: corp
apps:
  browser:
    access_point: host
  corp:
    access_point: host
access_points:
  host:
    interface: default
    dns: system
`
	tests := []struct {
		name  string
		yaml  string
		check func(t *testing.T, p *Policy)
	}{
		{
			name: "defaults",
			yaml: base,
			check: func(t *testing.T, p *Policy) {
				want := Control{SocketMode: 0o660}
				if p.Control.Socket != want.Socket || p.Control.SocketMode != want.SocketMode || p.Control.HTTP != "" || p.Control.PAC != nil {
					t.Errorf("control = %+v, want %+v", p.Control, want)
				}
			},
		},
		{
			name: "every field",
			yaml: base + `
control:
  socket: /tmp/iapd-test.sock
  socket_mode: 0600
  http: localhost:9180
  pac:
    - hosts: ["*.corp.example", 10.0.0.0/8]
      app: corp
    - hosts: [localhost]
      direct: true
    - hosts: ["*"]
      app: browser
`,
			check: func(t *testing.T, p *Policy) {
				c := p.Control
				if c.Socket != "/tmp/iapd-test.sock" {
					t.Errorf("socket = %q, want /tmp/iapd-test.sock", c.Socket)
				}
				if c.SocketMode != 0o600 {
					t.Errorf("socket mode = %o, want 600", c.SocketMode)
				}
				if c.HTTP != "localhost:9180" {
					t.Errorf("http = %q, want localhost:9180", c.HTTP)
				}
				if len(c.PAC) != 3 {
					t.Fatalf("%d PAC rules, want 3", len(c.PAC))
				}
				if !slices.Equal(c.PAC[0].Hosts, []string{"*.corp.example", "10.0.0.0/8"}) {
					t.Errorf("rule 0 hosts = %q", c.PAC[0].Hosts)
				}
				if c.PAC[0].App != p.Apps["corp"] || c.PAC[0].Listener != p.Listeners[1] {
					t.Errorf("rule 0 goes to app %v on listener %v, want corp on the second listener", c.PAC[0].App, c.PAC[0].Listener)
				}
				if !c.PAC[1].Direct || c.PAC[1].App != nil {
					t.Errorf("rule 1 = %+v, want direct", c.PAC[1])
				}
				if c.PAC[2].Listener != p.Listeners[0] {
					t.Errorf("rule 2 listener = %v, want the first listener", c.PAC[2].Listener)
				}
			},
		},
		{
			name: "remote http allowed",
			yaml: base + `
control:
  http: "[2001:db8::1]:9180"
  http_remote: true
`,
			check: func(t *testing.T, p *Policy) {
				if p.Control.HTTP != "[2001:db8::1]:9180" {
					t.Errorf("http = %q", p.Control.HTTP)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Parse("iapd.yaml", []byte(tt.yaml))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			tt.check(t, p)
		})
	}
}
