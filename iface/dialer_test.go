package iface

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"iapd/policy"
)

func TestDialerErrors(t *testing.T) {
	m, _ := newFakeMonitor(t, newSnapshot([]Interface{
		{Index: 2, Name: "cell", Up: false},
		{Index: 4, Name: "eth0", Up: true, Carrier: false, Preferred: mustAddrs("198.51.100.2")},
		{Index: 3, Name: "lan", Up: true, Carrier: true, Addrs: mustPrefixes("192.0.2.2/24"), Preferred: mustAddrs("192.0.2.2")},
	}, nil))
	p := testPolicy(
		&policy.AccessPoint{Name: "cell", Interface: "cell"},
		&policy.AccessPoint{Name: "lan", Interface: "lan"},
		&policy.AccessPoint{Name: "wwan", Interface: "wwan0"},
		&policy.AccessPoint{Name: "wired", Interface: "eth0"},
	)
	dialers := newDialers(p, assignSlots(p, nil), m, nil)
	dialer := func(name string) *Dialer { return dialers[p.AccessPoints[name]] }

	tests := []struct {
		name    string
		dialer  *Dialer
		network string
		address string
		wantIs  error
		wantErr string
	}{
		{
			name: "nil dialer", dialer: nil, network: "tcp", address: "192.0.2.10:80",
			wantIs:  ErrUnknownAccessPoint,
			wantErr: "dialing tcp 192.0.2.10:80: iface: unknown access point",
		},
		{
			name: "unsupported network", dialer: dialer("lan"), network: "unix", address: "/run/x.sock",
			wantErr: `dialing unix /run/x.sock via access point "lan": unsupported network "unix"`,
		},
		{
			name: "host name instead of address", dialer: dialer("lan"), network: "tcp", address: "example.com:80",
			wantErr: `dialing tcp example.com:80 via access point "lan": address must be IP:port, because names are resolved before dialing: ParseAddr("example.com"): unexpected character (at "example.com")`,
		},
		{
			name: "interface missing", dialer: dialer("wwan"), network: "tcp", address: "192.0.2.10:80",
			wantIs:  ErrInterfaceDown,
			wantErr: `dialing tcp 192.0.2.10:80 via access point "wwan": interface wwan0 not found: iface: interface down or missing: network is unreachable`,
		},
		{
			name: "interface down", dialer: dialer("cell"), network: "udp", address: "192.0.2.53:53",
			wantIs:  ErrInterfaceDown,
			wantErr: `dialing udp 192.0.2.53:53 via access point "cell": interface cell is down: iface: interface down or missing: network is unreachable`,
		},
		{
			name: "interface without carrier", dialer: dialer("wired"), network: "tcp", address: "198.51.100.10:80",
			wantIs:  ErrInterfaceDown,
			wantErr: `dialing tcp 198.51.100.10:80 via access point "wired": interface eth0 has no carrier: iface: interface down or missing: network is unreachable`,
		},
		{
			name: "no address of the target family", dialer: dialer("lan"), network: "tcp", address: "[2001:db8::10]:443",
			wantIs:  ErrNoAddress,
			wantErr: `dialing tcp [2001:db8::10]:443 via access point "lan": interface lan has no IPv6 address: iface: no source address of the target's family: network is unreachable`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			c, err := tt.dialer.DialContext(ctx, tt.network, tt.address)
			if err == nil {
				c.Close()
				t.Fatal("DialContext succeeded, want an error")
			}
			if err.Error() != tt.wantErr {
				t.Errorf("error = %q\nwant    %q", err, tt.wantErr)
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Errorf("error does not wrap %v", tt.wantIs)
			}
		})
	}
}

func TestDialerLoopbackUnbound(t *testing.T) {
	m, _ := newFakeMonitor(t, newSnapshot([]Interface{{Index: 2, Name: "cell", Up: false}}, nil))
	p := testPolicy(
		&policy.AccessPoint{Name: "fallback", Interface: policy.DefaultInterface},
		&policy.AccessPoint{Name: "cell", Interface: "cell"},
	)
	dialers := newDialers(p, assignSlots(p, nil), m, nil)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, "hello")
			c.Close()
		}
	}()

	tests := []struct {
		name string
		ap   string
	}{
		{name: "interface default", ap: "fallback"},
		// Loopback is left unbound even though cell is down.
		{name: "bound access point", ap: "cell"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			c, err := dialers[p.AccessPoints[tt.ap]].DialContext(ctx, "tcp", ln.Addr().String())
			if err != nil {
				t.Fatalf("DialContext: %v", err)
			}
			defer c.Close()
			b, err := io.ReadAll(c)
			if err != nil {
				t.Fatal(err)
			}
			if string(b) != "hello" {
				t.Errorf("read %q, want hello", b)
			}
		})
	}
}
