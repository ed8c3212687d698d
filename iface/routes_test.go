package iface

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"iapd/policy"
)

func TestDesiredRoutes(t *testing.T) {
	cell := Interface{
		Index: 5, Name: "cell", Up: true, Carrier: true,
		Addrs:     mustPrefixes("192.0.2.2/24", "2001:db8:1::2/64", "fe80::2/64"),
		Preferred: mustAddrs("192.0.2.2", "2001:db8:1::2"),
		OnLink:    mustPrefixes("192.0.2.0/24", "2001:db8:1::/64", "fe80::/64"),
	}
	withGateways := cell
	withGateways.Gateways = mustAddrs("192.0.2.1", "fe80::1")
	v4Only := cell
	v4Only.Preferred = mustAddrs("192.0.2.2")
	down := cell
	down.Up = false
	tunnel := Interface{
		Index: 9, Name: "wg0", Up: true, Carrier: true, PointToPoint: true, NoARP: true,
		Addrs: mustPrefixes("10.8.0.2/32"), Preferred: mustAddrs("10.8.0.2"),
	}

	tests := []struct {
		name          string
		ap            *policy.AccessPoint
		ifc           *Interface
		want          []string
		wantNoGateway []string
	}{
		{
			name: "policy gateway",
			ap:   &policy.AccessPoint{Interface: "cell", Gateways: mustAddrs("192.0.2.1", "2001:db8:1::1")},
			ifc:  &withGateways, // the policy wins over the main table
			want: []string{
				"192.0.2.0/24 dev 5 table 18101",
				"2001:db8:1::/64 dev 5 table 18101",
				"fe80::/64 dev 5 table 18101",
				"0.0.0.0/0 via 192.0.2.1 dev 5 table 18101",
				"::/0 via 2001:db8:1::1 dev 5 table 18101",
			},
		},
		{
			name: "discovered gateway",
			ap:   &policy.AccessPoint{Interface: "cell"},
			ifc:  &withGateways,
			want: []string{
				"192.0.2.0/24 dev 5 table 18101",
				"2001:db8:1::/64 dev 5 table 18101",
				"fe80::/64 dev 5 table 18101",
				"0.0.0.0/0 via 192.0.2.1 dev 5 table 18101",
				"::/0 via fe80::1 dev 5 table 18101",
			},
		},
		{
			name: "policy gateway outside attached networks is onlink",
			ap:   &policy.AccessPoint{Interface: "cell", Gateways: mustAddrs("203.0.113.1")},
			ifc:  &v4Only,
			want: []string{
				"192.0.2.0/24 dev 5 table 18101",
				"0.0.0.0/0 via 203.0.113.1 dev 5 table 18101 onlink",
			},
		},
		{
			name: "point-to-point without gateway",
			ap:   &policy.AccessPoint{Interface: "wg0"},
			ifc:  &tunnel,
			want: []string{"0.0.0.0/0 dev 9 table 18101"},
		},
		{
			name:          "no gateway",
			ap:            &policy.AccessPoint{Interface: "cell"},
			ifc:           &cell,
			want:          []string{"192.0.2.0/24 dev 5 table 18101", "2001:db8:1::/64 dev 5 table 18101", "fe80::/64 dev 5 table 18101"},
			wantNoGateway: []string{"IPv4", "IPv6"},
		},
		{
			name: "family without address is left out",
			ap:   &policy.AccessPoint{Interface: "cell", Gateways: mustAddrs("2001:db8:1::1")},
			ifc:  &v4Only,
			want: []string{"192.0.2.0/24 dev 5 table 18101"},
			// IPv4 has an address but no gateway; IPv6 has no address.
			wantNoGateway: []string{"IPv4"},
		},
		{
			name: "configured source adds the family",
			ap:   &policy.AccessPoint{Interface: "cell", Gateways: mustAddrs("2001:db8:1::1"), Sources: mustAddrs("2001:db8:1::2")},
			ifc:  &v4Only,
			want: []string{
				"192.0.2.0/24 dev 5 table 18101",
				"2001:db8:1::/64 dev 5 table 18101",
				"fe80::/64 dev 5 table 18101",
				"::/0 via 2001:db8:1::1 dev 5 table 18101",
			},
			wantNoGateway: []string{"IPv4"},
		},
		{name: "interface down", ap: &policy.AccessPoint{Interface: "cell", Gateways: mustAddrs("192.0.2.1")}, ifc: &down},
		{name: "interface missing", ap: &policy.AccessPoint{Interface: "cell", Gateways: mustAddrs("192.0.2.1")}, ifc: nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			routes, noGateway := desiredRoutes(tt.ap, 18101, tt.ifc)
			var got []string
			for _, r := range routes {
				got = append(got, r.String())
			}
			if strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
				t.Errorf("routes:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
			}
			if fmt.Sprint(noGateway) != fmt.Sprint(tt.wantNoGateway) {
				t.Errorf("families without gateway = %v, want %v", noGateway, tt.wantNoGateway)
			}
		})
	}
}

func TestIsAttachedLinkLocalGateway(t *testing.T) {
	ifc := &Interface{OnLink: mustPrefixes("192.0.2.0/24")}
	tests := []struct {
		name string
		gw   string
		want bool
	}{
		{name: "inside attached network", gw: "192.0.2.1", want: true},
		{name: "outside attached network", gw: "198.51.100.1", want: false},
		{name: "IPv6 link-local", gw: "fe80::1", want: true},
		{name: "IPv6 global without route", gw: "2001:db8::1", want: false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := isAttached(ifc, netip.MustParseAddr(tt.gw)); got != tt.want {
				t.Errorf("isAttached(%s) = %v, want %v", tt.gw, got, tt.want)
			}
		})
	}
}
