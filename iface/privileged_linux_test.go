package iface

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"iapd/internal/netnstest"
	"iapd/policy"
)

// waitFor waits until cond holds for the monitor's snapshot, or fails the
// test after five seconds. It wakes on every published change instead of
// sleeping.
func waitFor(t *testing.T, m *Monitor, what string, cond func(*Snapshot) bool) *Snapshot {
	t.Helper()
	changed := make(chan struct{}, 1)
	unregister := m.RegisterChangeCallback(func(old, new *Snapshot) {
		select {
		case changed <- struct{}{}:
		default:
		}
	})
	defer unregister()

	deadline := time.After(5 * time.Second)
	for {
		s := m.Snapshot()
		if cond(s) {
			return s
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("waiting for %s: not seen within 5s; last snapshot: %s", what, describe(s))
		}
	}
}

func describe(s *Snapshot) string {
	var parts []string
	for _, ifc := range s.Interfaces() {
		parts = append(parts, fmt.Sprintf("%s#%d up=%v carrier=%v addrs=%v gateways=%v", ifc.Name, ifc.Index, ifc.Up, ifc.Carrier, ifc.Addrs, ifc.Gateways))
	}
	return strings.Join(parts, "; ")
}

func TestPrivilegedMonitorFollowsLink(t *testing.T) {
	netnstest.Require(t)
	ns := netnstest.New(t, "mon")
	logger, _ := newTestLogger(t)

	var m *Monitor
	if err := ns.Do(func() (err error) {
		m, err = NewMonitor(logger)
		return err
	}); err != nil {
		t.Fatalf("NewMonitor: %v", err)
	}
	t.Cleanup(func() { m.Close() })

	if _, ok := m.Snapshot().Interface("lo"); !ok {
		t.Fatalf("initial snapshot has no lo: %s", describe(m.Snapshot()))
	}

	// The kernel here has no dummy links, so a veth pair stands in: d0 has
	// carrier only while its peer d0p is up too.
	ns.IP(t, "link", "add", "d0", "type", "veth", "peer", "name", "d0p")
	s := waitFor(t, m, "d0 added and down", func(s *Snapshot) bool {
		ifc, ok := s.Interface("d0")
		return ok && !ifc.Up
	})
	first, _ := s.Interface("d0")

	ns.IP(t, "link", "set", "d0p", "up")
	ns.IP(t, "link", "set", "d0", "up")
	waitFor(t, m, "d0 up with carrier", func(s *Snapshot) bool {
		ifc, ok := s.Interface("d0")
		return ok && ifc.Up && ifc.Carrier
	})

	ns.IP(t, "addr", "add", "198.51.100.5/24", "dev", "d0")
	ns.IP(t, "route", "add", "default", "via", "198.51.100.1", "dev", "d0")
	s = waitFor(t, m, "d0 addressed with default route", func(s *Snapshot) bool {
		ifc, ok := s.Interface("d0")
		return ok && slices.Contains(ifc.Preferred, netip.MustParseAddr("198.51.100.5")) && len(ifc.Gateways) == 1
	})
	d0, _ := s.Interface("d0")
	if !slices.Contains(d0.Addrs, netip.MustParsePrefix("198.51.100.5/24")) {
		t.Errorf("d0 addrs = %v, want 198.51.100.5/24 among them", d0.Addrs)
	}
	if !slices.Contains(d0.OnLink, netip.MustParsePrefix("198.51.100.0/24")) {
		t.Errorf("d0 on-link = %v, want 198.51.100.0/24 among them", d0.OnLink)
	}
	if ifc, gw, ok := s.Default(false); !ok || ifc.Name != "d0" || gw != netip.MustParseAddr("198.51.100.1") {
		t.Errorf("Default(false) = %v, %s, %v, want d0 via 198.51.100.1", ifc, gw, ok)
	}
	if ok, reason := s.Usable(&policy.AccessPoint{Interface: "d0"}); !ok {
		t.Errorf("d0 not usable: %s", reason)
	}

	// Removing the address takes the default route through it along.
	ns.IP(t, "addr", "del", "198.51.100.5/24", "dev", "d0")
	waitFor(t, m, "d0 without IPv4 address and gateway", func(s *Snapshot) bool {
		ifc, ok := s.Interface("d0")
		if !ok || len(ifc.Gateways) != 0 {
			return false
		}
		return !slices.ContainsFunc(ifc.Addrs, func(p netip.Prefix) bool { return p.Addr().Is4() })
	})

	ns.IP(t, "link", "set", "d0", "down")
	s = waitFor(t, m, "d0 down", func(s *Snapshot) bool {
		ifc, ok := s.Interface("d0")
		return ok && !ifc.Up
	})
	if _, reason := s.Usable(&policy.AccessPoint{Interface: "d0"}); reason != "interface d0 is down" {
		t.Errorf("reason = %q, want %q", reason, "interface d0 is down")
	}

	ns.IP(t, "link", "del", "d0")
	waitFor(t, m, "d0 removed", func(s *Snapshot) bool {
		_, ok := s.Interface("d0")
		return !ok
	})

	ns.IP(t, "link", "add", "d0", "type", "veth", "peer", "name", "d0p")
	s = waitFor(t, m, "d0 re-created", func(s *Snapshot) bool {
		_, ok := s.Interface("d0")
		return ok
	})
	again, _ := s.Interface("d0")
	if again.Index == first.Index {
		t.Errorf("re-created d0 has index %d, the same as before", again.Index)
	}
	if byIndex, ok := s.ByIndex(again.Index); !ok || byIndex.Name != "d0" {
		t.Errorf("ByIndex(%d) = %v, %v, want d0", again.Index, byIndex, ok)
	}
}

// uplink is a namespace behind one of host's links, serving on the same
// addresses as every other uplink.
type uplink struct {
	name string
	ns   *netnstest.NS
}

var (
	serverV4 = "203.0.113.10:80"
	serverV6 = "[2001:db8:ff::10]:80"
)

// newUplink joins a new namespace to host by a veth pair, host's end named
// name, with the same address plan as every uplink, and starts a TCP server
// that writes back the uplink's name and the client address it saw.
func newUplink(t *testing.T, host *netnstest.NS, name string) *uplink {
	t.Helper()
	up := &uplink{name: name, ns: netnstest.New(t, "up-"+name)}
	up.connect(t, host)
	up.ns.IP(t, "addr", "add", "203.0.113.10/32", "dev", "lo")
	// Without nodad the address stays tentative, and unbindable, until the
	// kernel's DAD work has run, even on lo.
	up.ns.IP(t, "addr", "add", "2001:db8:ff::10/128", "dev", "lo", "nodad")
	for _, addr := range []string{serverV4, serverV6} {
		ln := up.ns.Listen(t, "tcp", addr)
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "up-%s %s", name, c.RemoteAddr())
				c.Close()
			}
		}()
	}
	return up
}

// connect creates the veth pair and its addresses; called again after the
// pair was deleted, it re-creates it under the same names.
func (up *uplink) connect(t *testing.T, host *netnstest.NS) {
	t.Helper()
	netnstest.Veth(t, host, up.name, up.ns, "eth0")
	host.IP(t, "addr", "add", "192.0.2.2/24", "dev", up.name)
	host.IP(t, "addr", "add", "2001:db8:1::2/64", "dev", up.name, "nodad")
	up.ns.IP(t, "addr", "add", "192.0.2.1/24", "dev", "eth0")
	up.ns.IP(t, "addr", "add", "2001:db8:1::1/64", "dev", "eth0", "nodad")
	up.ns.IP(t, "link", "set", "eth0", "up")
	host.IP(t, "link", "set", up.name, "up")
}

// dialIn dials address through d on a thread inside ns, so that the socket
// belongs to ns, and returns what the server wrote.
func dialIn(ns *netnstest.NS, d *Dialer, network, address string, timeout time.Duration) (string, error) {
	var reply string
	err := ns.Do(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		c, err := d.DialContext(ctx, network, address)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(timeout))
		b, err := io.ReadAll(c)
		reply = string(b)
		return err
	})
	return reply, err
}

func TestPrivilegedManagerRoutesPerAccessPoint(t *testing.T) {
	netnstest.Require(t)
	host := netnstest.New(t, "host")
	// Replies through cell arrive on an interface that is not the main
	// table's way back, which strict reverse path filtering would drop.
	host.Exec(t, "sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=2")
	newUplink(t, host, "wifi")
	cell := newUplink(t, host, "cell")
	host.IP(t, "route", "add", "default", "via", "192.0.2.1", "dev", "wifi")

	p := testPolicy(
		&policy.AccessPoint{Name: "wifi", Interface: "wifi"},
		&policy.AccessPoint{Name: "cell", Interface: "cell", Gateways: mustAddrs("192.0.2.1", "2001:db8:1::1")},
	)
	logger, logs := newTestLogger(t)
	var mgr *Manager
	if err := host.Do(func() (err error) {
		mgr, err = NewManager(ManagerConfig{Policy: p, Logger: logger})
		return err
	}); err != nil {
		t.Fatalf("NewManager: %v", err)
	}
	t.Cleanup(func() { mgr.Close() })
	cellDialer := mgr.Dialer(p.AccessPoints["cell"])
	wifiDialer := mgr.Dialer(p.AccessPoints["wifi"])
	if mgr.Dialer(p.AccessPoints["cell"]) != cellDialer {
		t.Error("Dialer returned a different value for the same access point")
	}
	if d := mgr.Dialer(&policy.AccessPoint{Name: "cell", Interface: "cell"}); d != nil {
		t.Errorf("Dialer for an access point outside the policy = %v, want nil", d)
	}

	tests := []struct {
		name    string
		dialer  *Dialer
		address string
		want    string
	}{
		{name: "IPv4 via cell", dialer: cellDialer, address: serverV4, want: "up-cell 192.0.2.2:"},
		{name: "IPv4 via wifi", dialer: wifiDialer, address: serverV4, want: "up-wifi 192.0.2.2:"},
		{name: "IPv6 via cell", dialer: cellDialer, address: serverV6, want: "up-cell [2001:db8:1::2]:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := dialIn(host, tt.dialer, "tcp", tt.address, 2*time.Second)
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			if !strings.HasPrefix(got, tt.want) {
				t.Errorf("server replied %q, want %q followed by a port", got, tt.want)
			}
		})
	}

	rules := host.IP(t, "rule", "show")
	for _, want := range []string{
		"18100:\tfrom all fwmark 0x1a900 lookup 18100",
		"18100:\tfrom all fwmark 0x1a901 lookup 18101",
		"18101:\tfrom all fwmark 0x1a900 unreachable",
		"18101:\tfrom all fwmark 0x1a901 unreachable",
	} {
		if !strings.Contains(rules, want) {
			t.Errorf("ip rule lacks %q:\n%s", want, rules)
		}
	}
	table4 := host.IP(t, "route", "show", "table", "18101")
	for _, want := range []string{"default via 192.0.2.1 dev cell", "192.0.2.0/24 dev cell"} {
		if !strings.Contains(table4, want) {
			t.Errorf("table 18101 lacks %q:\n%s", want, table4)
		}
	}
	if table6 := host.IP(t, "-6", "route", "show", "table", "18101"); !strings.Contains(table6, "default via 2001:db8:1::1 dev cell") {
		t.Errorf("IPv6 table 18101 lacks the default route via 2001:db8:1::1:\n%s", table6)
	}
	// wifi's IPv4 gateway comes from the main table; it has no IPv6 one.
	if table := host.IP(t, "route", "show", "table", "18100"); !strings.Contains(table, "default via 192.0.2.1 dev wifi") {
		t.Errorf("table 18100 lacks the discovered default route via 192.0.2.1:\n%s", table)
	}
	if got := logs.matching("level=WARN", "no gateway", "access_point=wifi", "family=IPv6"); len(got) != 1 {
		t.Errorf("logged %d no-gateway warnings for wifi IPv6, want 1", len(got))
	}

	// A link that goes down makes dials fail at once.
	host.IP(t, "link", "set", "cell", "down")
	waitFor(t, mgr.Monitor(), "cell down", func(s *Snapshot) bool {
		ifc, ok := s.Interface("cell")
		return ok && !ifc.Up
	})
	_, err := dialIn(host, cellDialer, "tcp", serverV4, 2*time.Second)
	if !errors.Is(err, ErrInterfaceDown) {
		t.Fatalf("dial via a down link: %v, want ErrInterfaceDown", err)
	}
	if want := `dialing tcp 203.0.113.10:80 via access point "cell": interface cell is down: iface: interface down or missing: network is unreachable`; err.Error() != want {
		t.Errorf("error = %q\nwant    %q", err, want)
	}

	// A re-created link has a new index; iapd follows it by name.
	old, _ := mgr.Snapshot().Interface("cell")
	host.IP(t, "link", "del", "cell")
	cell.connect(t, host)
	waitFor(t, mgr.Monitor(), "cell re-created and up", func(s *Snapshot) bool {
		ifc, ok := s.Interface("cell")
		return ok && ifc.Index != old.Index && ifc.Up && ifc.Carrier && len(ifc.Preferred) > 0
	})
	// The routes follow right after the snapshot; until then a dial leaves
	// without a route and times out, so retry briefly.
	var reply string
	deadline := time.Now().Add(5 * time.Second)
	for {
		reply, err = dialIn(host, cellDialer, "tcp", serverV4, 300*time.Millisecond)
		if err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatalf("dial via re-created cell: %v\ntable 18101:\n%s", err, host.IP(t, "route", "show", "table", "18101"))
	}
	if !strings.HasPrefix(reply, "up-cell 192.0.2.2:") {
		t.Errorf("server replied %q after re-creation, want up-cell 192.0.2.2:port", reply)
	}
	if got, _ := dialIn(host, wifiDialer, "tcp", serverV4, 2*time.Second); !strings.HasPrefix(got, "up-wifi ") {
		t.Errorf("wifi replied %q after cell was re-created, want up-wifi", got)
	}

	// Close removes everything iapd added, and only that.
	if err := mgr.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := mgr.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if rules := host.IP(t, "rule", "show"); strings.Contains(rules, "fwmark") {
		t.Errorf("rules left after Close:\n%s", rules)
	}
	for _, family := range []string{"-4", "-6"} {
		for _, table := range []string{"18100", "18101"} {
			out, _ := exec.Command("ip", "-n", host.Name, family, "route", "show", "table", table).CombinedOutput()
			if s := strings.TrimSpace(string(out)); s != "" && !strings.Contains(s, "FIB table does not exist") {
				t.Errorf("table %s (%s) not empty after Close:\n%s", table, family, s)
			}
		}
	}
	if main := host.IP(t, "route", "show"); !strings.Contains(main, "default via 192.0.2.1 dev wifi") {
		t.Errorf("main table lost its default route:\n%s", main)
	}
}

func TestPrivilegedManagerRemovesLeftovers(t *testing.T) {
	netnstest.Require(t)
	host := netnstest.New(t, "host")
	newUplink(t, host, "cell")

	// What a crashed run with a larger policy would leave behind.
	host.IP(t, "rule", "add", "fwmark", "0x1a905", "lookup", "18105", "priority", "18100")
	host.IP(t, "route", "add", "default", "via", "192.0.2.1", "dev", "cell", "table", "18105")
	host.IP(t, "route", "add", "198.51.100.0/24", "via", "192.0.2.1", "dev", "cell", "table", "18100")
	host.IP(t, "rule", "add", "fwmark", "0x1a905", "priority", "18101", "unreachable")
	// Someone else's rule at another priority stays.
	host.IP(t, "rule", "add", "fwmark", "0x1a905", "lookup", "18105", "priority", "18200")

	p := testPolicy(&policy.AccessPoint{Name: "cell", Interface: "cell", Gateways: mustAddrs("192.0.2.1")})
	logger, logs := newTestLogger(t)
	var mgr *Manager
	if err := host.Do(func() (err error) {
		mgr, err = NewManager(ManagerConfig{Policy: p, Logger: logger})
		return err
	}); err != nil {
		t.Fatalf("NewManager: %v", err)
	}
	defer mgr.Close()

	if got := logs.matching("removed routing state of an earlier run", "rules=2", "routes=2"); len(got) != 1 {
		t.Errorf("logged %d matching lines about leftovers, want 1", len(got))
	}
	rules := host.IP(t, "rule", "show")
	if strings.Contains(rules, "18100:\tfrom all fwmark 0x1a905") || strings.Contains(rules, "18101:\tfrom all fwmark 0x1a905") {
		t.Errorf("leftover rule still installed:\n%s", rules)
	}
	if !strings.Contains(rules, "18200:\tfrom all fwmark 0x1a905 lookup 18105") {
		t.Errorf("rule at another priority was removed:\n%s", rules)
	}
	if table := host.IP(t, "route", "show", "table", "18100"); strings.Contains(table, "198.51.100.0/24") {
		t.Errorf("leftover route still in table 18100:\n%s", table)
	}
}

// TestPrivilegedManagerNeedsCapability runs NewManager in a child process
// whose capabilities lack CAP_NET_ADMIN and CAP_NET_RAW.
func TestPrivilegedManagerNeedsCapability(t *testing.T) {
	netnstest.Require(t)
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("setpriv (Debian package util-linux) is missing, and CI=true does not allow skipping")
		}
		t.Skip("needs setpriv (Debian package util-linux)")
	}
	cmd := exec.Command(setpriv, "--inh-caps=-all", "--bounding-set=-net_admin,-net_raw", "--", os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=new-manager")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	want := `iface: access point "cell" (interface cell) needs CAP_NET_ADMIN to mark its sockets and install routing table 18101: run iapd as root or grant the capability (systemd: AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW)`
	if got := strings.TrimSpace(string(out)); got != want {
		t.Errorf("NewManager without capabilities:\n%s\nwant:\n%s", got, want)
	}
}

func TestPrivilegedManagerPointToPoint(t *testing.T) {
	netnstest.Require(t)
	host := netnstest.New(t, "host")
	host.IP(t, "tuntap", "add", "t0", "mode", "tun")
	host.IP(t, "addr", "add", "10.8.0.2/32", "dev", "t0")
	host.IP(t, "link", "set", "t0", "up")

	p := testPolicy(&policy.AccessPoint{Name: "tunnel", Interface: "t0"})
	logger, logs := newTestLogger(t)
	var mgr *Manager
	if err := host.Do(func() (err error) {
		mgr, err = NewManager(ManagerConfig{Policy: p, Logger: logger})
		return err
	}); err != nil {
		t.Fatalf("NewManager: %v", err)
	}
	defer mgr.Close()

	// A tun link has no neighbours, so the default route needs no gateway.
	if table := host.IP(t, "route", "show", "table", "18100"); !strings.Contains(table, "default dev t0 proto static scope link") {
		t.Errorf("table 18100 lacks the default route straight out of t0:\n%s", table)
	}
	if got := logs.matching("no gateway"); len(got) != 0 {
		t.Errorf("warned about a missing gateway on a point-to-point link: %q", got)
	}
}

func TestPrivilegedManagerUpdate(t *testing.T) {
	netnstest.Require(t)
	host := netnstest.New(t, "host")
	host.Exec(t, "sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=2")
	newUplink(t, host, "wifi")
	newUplink(t, host, "cell")
	host.IP(t, "route", "add", "default", "via", "192.0.2.1", "dev", "wifi")
	logger, _ := newTestLogger(t)

	// The first policy binds nothing, so the manager starts without tables.
	first := testPolicy(&policy.AccessPoint{Name: "host", Interface: policy.DefaultInterface})
	var mgr *Manager
	if err := host.Do(func() (err error) {
		mgr, err = NewManager(ManagerConfig{Policy: first, Logger: logger})
		return err
	}); err != nil {
		t.Fatalf("NewManager: %v", err)
	}
	t.Cleanup(func() { mgr.Close() })

	update := func(p *policy.Policy) error {
		return host.Do(func() error { return mgr.Update(p) })
	}
	waitRules := func(want ...string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			var got []string
			for _, line := range strings.Split(host.IP(t, "rule", "show"), "\n") {
				if strings.HasPrefix(line, "18100:") {
					got = append(got, strings.TrimSpace(strings.TrimPrefix(line, "18100:")))
				}
			}
			// Rules of one priority are listed in the order they were added.
			slices.Sort(got)
			if slices.Equal(got, want) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("rules at priority 18100: %q, want %q", got, want)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	dialVia := func(p *policy.Policy, name, want string) {
		t.Helper()
		got, err := dialIn(host, mgr.Dialer(p.AccessPoints[name]), "tcp", serverV4, 2*time.Second)
		if err != nil || !strings.HasPrefix(got, want) {
			t.Fatalf("dial via %s: %q, %v; want %q", name, got, err, want)
		}
	}

	// wifi is new, so it takes the first free table although it comes
	// second in the file.
	second := testPolicy(
		&policy.AccessPoint{Name: "host", Interface: policy.DefaultInterface},
		&policy.AccessPoint{Name: "wifi", Interface: "wifi"},
	)
	if err := update(second); err != nil {
		t.Fatalf("Update to wifi: %v", err)
	}
	waitRules("from all fwmark 0x1a901 lookup 18101")
	dialVia(second, "wifi", "up-wifi ")

	// cell arrives before wifi in the file; wifi keeps its table.
	third := testPolicy(
		&policy.AccessPoint{Name: "cell", Interface: "cell", Gateways: mustAddrs("192.0.2.1")},
		&policy.AccessPoint{Name: "wifi", Interface: "wifi"},
	)
	if err := update(third); err != nil {
		t.Fatalf("Update to cell and wifi: %v", err)
	}
	waitRules("from all fwmark 0x1a900 lookup 18100", "from all fwmark 0x1a901 lookup 18101")
	dialVia(third, "cell", "up-cell ")
	dialVia(third, "wifi", "up-wifi ")
	if mgr.Dialer(second.AccessPoints["wifi"]) == nil {
		t.Errorf("the previous policy's wifi has no dialer right after the reload")
	}

	// wifi goes: its rule and its table's routes go with it.
	fourth := testPolicy(&policy.AccessPoint{Name: "cell", Interface: "cell", Gateways: mustAddrs("192.0.2.1")})
	if err := update(fourth); err != nil {
		t.Fatalf("Update to cell alone: %v", err)
	}
	waitRules("from all fwmark 0x1a900 lookup 18100")
	if table := host.IP(t, "route", "show", "table", "18101"); strings.TrimSpace(table) != "" {
		t.Errorf("table 18101 of the removed wifi still has routes:\n%s", table)
	}
	dialVia(fourth, "cell", "up-cell ")
	if mgr.Dialer(second.AccessPoints["wifi"]) != nil {
		t.Errorf("a policy two reloads old still has a dialer")
	}

	// A change of routing numbers needs a restart.
	moved := testPolicy(&policy.AccessPoint{Name: "cell", Interface: "cell"})
	moved.Routing.Table = 18200
	err := update(moved)
	want := "routing numbers changed (table 18100, mark 0x1a900, priority 18100 before; table 18200, mark 0x1a900, priority 18100 now): restart iapd to apply them"
	if err == nil || err.Error() != want {
		t.Errorf("Update with new routing numbers = %v\nwant %s", err, want)
	}
	waitRules("from all fwmark 0x1a900 lookup 18100")

	if err := mgr.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	waitRules()
}

// TestPrivilegedManagerUnreachableWithoutRoute dials through an access
// point whose table has no default route while the main table has one
// through another interface. The marked socket must not fall through to
// the main table, where the kernel would take the target for on-link and
// wait for neighbour resolution: it must fail at once.
func TestPrivilegedManagerUnreachableWithoutRoute(t *testing.T) {
	netnstest.Require(t)
	host := netnstest.New(t, "host")
	host.Exec(t, "sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=2")
	newUplink(t, host, "wifi")
	newUplink(t, host, "cell")
	host.IP(t, "route", "add", "default", "via", "192.0.2.1", "dev", "wifi")

	// cell has no gateway, in the policy or the main table, so its table
	// holds only its attached network.
	p := testPolicy(&policy.AccessPoint{Name: "cell", Interface: "cell"})
	logger, _ := newTestLogger(t)
	var mgr *Manager
	if err := host.Do(func() (err error) {
		mgr, err = NewManager(ManagerConfig{Policy: p, Logger: logger})
		return err
	}); err != nil {
		t.Fatalf("NewManager: %v", err)
	}
	t.Cleanup(func() { mgr.Close() })
	if !mgr.RoutesReady(p.AccessPoints["cell"]) {
		t.Errorf("RoutesReady(cell) = false with its attached network installed")
	}
	if table := host.IP(t, "route", "show", "table", "18100"); strings.Contains(table, "default") {
		t.Fatalf("table 18100 has a default route, want none:\n%s", table)
	}

	tests := []struct {
		name    string
		address string
	}{
		{name: "IPv4", address: serverV4},
		{name: "IPv6", address: serverV6},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			_, err := dialIn(host, mgr.Dialer(p.AccessPoints["cell"]), "tcp", tt.address, 3*time.Second)
			elapsed := time.Since(start)
			if !errors.Is(err, syscall.ENETUNREACH) {
				t.Fatalf("dial: %v, want ENETUNREACH", err)
			}
			if !strings.Contains(err.Error(), "network is unreachable") {
				t.Errorf("error %q does not say network is unreachable", err)
			}
			if elapsed > 500*time.Millisecond {
				t.Errorf("dial failed after %v, want at once", elapsed)
			}
			if !errors.Is(err, ErrNoRoute) {
				t.Errorf("dial error %v does not wrap ErrNoRoute", err)
			}
		})

		// A socket with the mark alone, not bound to the interface, must
		// meet the unreachable rule instead of the main table's default
		// route through wifi.
		t.Run(tt.name+" marked socket", func(t *testing.T) {
			start := time.Now()
			err := host.Do(func() error {
				d := net.Dialer{Timeout: 3 * time.Second, Control: setMark(0x1a900)}
				c, err := d.Dial("tcp", tt.address)
				if err == nil {
					c.Close()
				}
				return err
			})
			if !errors.Is(err, syscall.ENETUNREACH) {
				t.Fatalf("dial: %v, want ENETUNREACH", err)
			}
			if elapsed := time.Since(start); elapsed > 500*time.Millisecond {
				t.Errorf("dial failed after %v, want at once", elapsed)
			}
		})
	}

	if err := mgr.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for _, family := range []string{"-4", "-6"} {
		if rules := host.IP(t, family, "rule", "show"); strings.Contains(rules, "fwmark") {
			t.Errorf("rules left after Close (%s):\n%s", family, rules)
		}
	}
}
