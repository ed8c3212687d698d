package cli

import (
	"log/slog"
	"net/netip"
	"slices"
	"testing"

	"iapd/dns"
	"iapd/policy"
)

// testLogger returns a logger that writes through t.Log.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testLogWriter struct{ t *testing.T }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(p))
	return len(p), nil
}

func TestOverlapping(t *testing.T) {
	closing := []closingSocket{
		{network: "tcp", addr: netip.MustParseAddrPort("127.0.0.1:1080")},
		{network: "tcp", addr: netip.MustParseAddrPort("[::1]:1081")},
		{network: "udp", addr: netip.MustParseAddrPort("127.0.0.1:5353")},
		{network: "tcp", addr: netip.MustParseAddrPort("0.0.0.0:8080")},
	}
	tests := []struct {
		name    string
		network string
		address string
		want    []string
	}{
		{name: "IPv4 wildcard over loopback", network: "tcp", address: "0.0.0.0:1080", want: []string{"127.0.0.1:1080"}},
		{name: "empty host over loopback", network: "tcp", address: ":1080", want: []string{"127.0.0.1:1080"}},
		{name: "IPv6 wildcard over both families", network: "tcp", address: "[::]:1081", want: []string{"[::1]:1081"}},
		{name: "localhost is 127.0.0.1", network: "tcp", address: "localhost:1080", want: []string{"127.0.0.1:1080"}},
		{name: "loopback under IPv4 wildcard", network: "tcp", address: "127.0.0.5:8080", want: []string{"0.0.0.0:8080"}},
		{name: "same address over udp", network: "udp", address: "127.0.0.1:5353", want: []string{"127.0.0.1:5353"}},
		{name: "other loopback address", network: "tcp", address: "127.0.0.2:1080"},
		{name: "IPv4 wildcard misses IPv6", network: "tcp", address: "0.0.0.0:1081"},
		{name: "other port", network: "tcp", address: "0.0.0.0:1082"},
		{name: "other network", network: "tcp", address: "127.0.0.1:5353"},
		{name: "port 0", network: "tcp", address: "0.0.0.0:0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			for _, s := range overlapping(closing, tt.network, tt.address) {
				got = append(got, s.addr.String())
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("overlapping(%s %s) = %q, want %q", tt.network, tt.address, got, tt.want)
			}
		})
	}
}

func TestPlanListenersDNS(t *testing.T) {
	newDNSListener := func() *dns.Listener {
		return dns.NewListener(dns.ListenerConfig{Route: func(string) ([]*dns.Resolver, []string, error) { return nil, nil, nil }})
	}
	app := func(name, listen string) *policy.App { return &policy.App{Name: name, DNSListen: listen} }
	open := []*openDNSListener{
		{app: app("browser", "127.0.0.1:5391"), addr: "127.0.0.1:5391", dl: newDNSListener()},
		{app: app("mail", "127.0.0.1:5392"), addr: "127.0.0.1:5392", dl: newDNSListener()},
		{app: app("ota", "127.0.0.1:5393"), addr: "127.0.0.1:5393", dl: newDNSListener()},
	}
	// browser moves, mail stays, web takes the address of ota, which
	// loses its DNS listener, and updates has none.
	p := &policy.Policy{Apps: map[string]*policy.App{
		"browser": app("browser", "127.0.0.1:5394"),
		"mail":    app("mail", "127.0.0.1:5392"),
		"web":     app("web", "127.0.0.1:5393"),
		"ota":     app("ota", ""),
		"updates": app("updates", ""),
	}}
	plan := planListeners(nil, open, p, testLogger(t))

	tests := []struct {
		name   string
		got    *openDNSListener
		app    string
		addr   string
		socket *dns.Listener // nil for a listener that opens
	}{
		{name: "moved", got: plan.dnsNext[0], app: "browser", addr: "127.0.0.1:5394"},
		{name: "kept", got: plan.dnsNext[1], app: "mail", addr: "127.0.0.1:5392", socket: open[1].dl},
		{name: "passed to another app", got: plan.dnsNext[2], app: "web", addr: "127.0.0.1:5393", socket: open[2].dl},
	}
	if len(plan.dnsNext) != len(tests) {
		t.Fatalf("plan has %d DNS listeners, want %d", len(plan.dnsNext), len(tests))
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.got.app != p.Apps[tt.app] {
				t.Errorf("app %q, want the new policy's %s", tt.got.app.Name, tt.app)
			}
			if tt.got.addr != tt.addr {
				t.Errorf("address %s, want %s", tt.got.addr, tt.addr)
			}
			if tt.got.dl != tt.socket {
				t.Errorf("listener %p, want %p", tt.got.dl, tt.socket)
			}
			if added := slices.Contains(plan.dnsAdded, tt.got); added != (tt.socket == nil) {
				t.Errorf("added = %v, want %v", added, tt.socket == nil)
			}
		})
	}
	if len(plan.dnsRemoved) != 1 || plan.dnsRemoved[0] != open[0] {
		t.Errorf("removed %v, want only browser's 127.0.0.1:5391", plan.dnsRemoved)
	}
}
