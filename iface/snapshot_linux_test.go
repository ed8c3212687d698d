package iface

import (
	"fmt"
	"net"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func ipNet(s string) *net.IPNet {
	ip, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	n.IP = ip
	return n
}

// TestBuildSnapshot feeds the builder values as netlink decodes them from
// a host with Wi-Fi holding the default route, a cellular link without
// carrier and a WireGuard tunnel.
func TestBuildSnapshot(t *testing.T) {
	links := []netlink.Link{
		&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: 1, Name: "lo", Flags: net.FlagUp | net.FlagLoopback, RawFlags: unix.IFF_UP | unix.IFF_LOOPBACK | unix.IFF_LOWER_UP}},
		&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: 3, Name: "wlan0", Flags: net.FlagUp | net.FlagBroadcast, RawFlags: unix.IFF_UP | unix.IFF_BROADCAST | unix.IFF_LOWER_UP}},
		&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: 4, Name: "cell", Flags: net.FlagUp, RawFlags: unix.IFF_UP}},
		&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Index: 7, Name: "wg0", Flags: net.FlagUp | net.FlagPointToPoint, RawFlags: unix.IFF_UP | unix.IFF_POINTOPOINT | unix.IFF_NOARP | unix.IFF_LOWER_UP}},
	}
	addrs := []netlink.Addr{
		{IPNet: ipNet("127.0.0.1/8"), LinkIndex: 1, Scope: unix.RT_SCOPE_HOST},
		{IPNet: ipNet("192.0.2.2/24"), LinkIndex: 3, Scope: unix.RT_SCOPE_UNIVERSE},
		{IPNet: &net.IPNet{IP: net.ParseIP("198.51.100.7"), Mask: net.CIDRMask(120, 128)}, LinkIndex: 4, Scope: unix.RT_SCOPE_UNIVERSE}, // IPv4 in 16 bytes
		{IPNet: ipNet("10.8.0.2/32"), LinkIndex: 7, Scope: unix.RT_SCOPE_UNIVERSE},
		{IPNet: ipNet("::1/128"), LinkIndex: 1, Scope: unix.RT_SCOPE_HOST},
		{IPNet: ipNet("2001:db8:1::aa/64"), LinkIndex: 3, Scope: unix.RT_SCOPE_UNIVERSE, Flags: unix.IFA_F_DEPRECATED},
		{IPNet: ipNet("2001:db8:1::bb/64"), LinkIndex: 3, Scope: unix.RT_SCOPE_UNIVERSE},
		{IPNet: ipNet("2001:db8:1::cc/64"), LinkIndex: 3, Scope: unix.RT_SCOPE_UNIVERSE, Flags: unix.IFA_F_TENTATIVE},
		{IPNet: ipNet("fe80::1/64"), LinkIndex: 3, Scope: unix.RT_SCOPE_LINK},
		{IPNet: ipNet("203.0.113.9/24"), LinkIndex: 42, Scope: unix.RT_SCOPE_UNIVERSE}, // link vanished between dumps
	}
	main := func(r netlink.Route) netlink.Route {
		r.Table = unix.RT_TABLE_MAIN
		if r.Type == 0 {
			r.Type = unix.RTN_UNICAST
		}
		if r.Family == 0 {
			r.Family = unix.AF_INET
		}
		return r
	}
	routes := []netlink.Route{
		main(netlink.Route{Dst: ipNet("0.0.0.0/0"), Gw: net.ParseIP("192.0.2.1"), LinkIndex: 3, Priority: 600}),
		main(netlink.Route{Dst: ipNet("0.0.0.0/0"), Gw: net.ParseIP("198.51.100.1").To4(), LinkIndex: 4, Priority: 700}),
		main(netlink.Route{Dst: ipNet("192.0.2.0/24"), LinkIndex: 3, Scope: netlink.SCOPE_LINK, Src: net.ParseIP("192.0.2.2")}),
		main(netlink.Route{Dst: ipNet("198.51.100.0/24"), LinkIndex: 4, Scope: netlink.SCOPE_LINK}),
		main(netlink.Route{Dst: ipNet("10.1.0.0/16"), Gw: net.ParseIP("192.0.2.254"), LinkIndex: 3}), // not default, has gateway
		main(netlink.Route{Dst: ipNet("::/0"), Gw: net.ParseIP("fe80::1"), LinkIndex: 3, Priority: 1024, Family: unix.AF_INET6}),
		main(netlink.Route{Dst: ipNet("2001:db8:1::/64"), LinkIndex: 3, Priority: 256, Family: unix.AF_INET6}),
		main(netlink.Route{Dst: ipNet("::/0"), LinkIndex: 7, Priority: 50, Family: unix.AF_INET6}),
		main(netlink.Route{Dst: ipNet("203.0.113.0/24"), Type: unix.RTN_UNREACHABLE}),
		{Dst: ipNet("0.0.0.0/0"), Gw: net.ParseIP("10.8.0.1"), LinkIndex: 7, Table: 18102, Type: unix.RTN_UNICAST, Family: unix.AF_INET},
	}

	s := buildSnapshot(links, addrs, routes)

	tests := []struct {
		name string
		got  func() any
		want string
	}{
		{name: "interfaces", got: func() any { return interfaceNames(s) }, want: "[lo wlan0 cell wg0]"},
		{name: "loopback flags", got: func() any { i, _ := s.Interface("lo"); return [3]bool{i.Up, i.Carrier, i.Loopback} }, want: "[true true true]"},
		{name: "wlan0 addrs", got: func() any { i, _ := s.Interface("wlan0"); return i.Addrs }, want: "[192.0.2.2/24 2001:db8:1::aa/64 2001:db8:1::bb/64 2001:db8:1::cc/64 fe80::1/64]"},
		{name: "wlan0 preferred skips deprecated tentative and link-local", got: func() any { i, _ := s.Interface("wlan0"); return i.Preferred }, want: "[192.0.2.2 2001:db8:1::bb]"},
		{name: "wlan0 gateways", got: func() any { i, _ := s.Interface("wlan0"); return i.Gateways }, want: "[192.0.2.1 fe80::1]"},
		{name: "wlan0 on-link", got: func() any { i, _ := s.Interface("wlan0"); return i.OnLink }, want: "[192.0.2.0/24 2001:db8:1::/64]"},
		{name: "cell has no carrier", got: func() any { i, _ := s.Interface("cell"); return [2]bool{i.Up, i.Carrier} }, want: "[true false]"},
		{name: "cell address from 16 bytes", got: func() any { i, _ := s.Interface("cell"); return i.Addrs }, want: "[198.51.100.7/24]"},
		{name: "cell gateway", got: func() any { i, _ := s.Interface("cell"); return i.Gateways }, want: "[198.51.100.1]"},
		{name: "wg0 flags", got: func() any { i, _ := s.Interface("wg0"); return [2]bool{i.PointToPoint, i.NoARP} }, want: "[true true]"},
		{name: "wg0 ignores other tables", got: func() any { i, _ := s.Interface("wg0"); return i.Gateways }, want: "[]"},
		{name: "IPv4 default", got: func() any { i, gw, _ := s.Default(false); return i.Name + " " + gw.String() }, want: "wlan0 192.0.2.1"},
		{name: "IPv6 default", got: func() any { i, gw, _ := s.Default(true); return i.Name + " " + gw.String() }, want: "wg0 invalid IP"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := fmt.Sprint(tt.got()); got != tt.want {
				t.Errorf("got %s, want %s", got, tt.want)
			}
		})
	}
}

func TestBuildSnapshotMultipathDefault(t *testing.T) {
	links := []netlink.Link{
		&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: 2, Name: "eth0", Flags: net.FlagUp}},
		&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: 3, Name: "eth1", Flags: net.FlagUp}},
	}
	routes := []netlink.Route{{
		Table: unix.RT_TABLE_MAIN, Type: unix.RTN_UNICAST, Family: unix.AF_INET,
		MultiPath: []*netlink.NexthopInfo{
			{LinkIndex: 2, Gw: net.ParseIP("192.0.2.1")},
			{LinkIndex: 3, Gw: net.ParseIP("198.51.100.1")},
		},
	}}
	s := buildSnapshot(links, nil, routes)
	for name, want := range map[string]string{"eth0": "[192.0.2.1]", "eth1": "[198.51.100.1]"} {
		ifc, _ := s.Interface(name)
		if got := fmt.Sprint(ifc.Gateways); got != want {
			t.Errorf("%s gateways = %s, want %s", name, got, want)
		}
	}
}
