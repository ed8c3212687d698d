package dns

import (
	"bufio"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/prop"
)

// copyLeases copies lease fixtures into a new directory with the given
// modification times, so that tests choose which lease is newest.
func copyLeases(t *testing.T, files map[string]time.Time) string {
	t.Helper()
	dir := t.TempDir()
	for name, mtime := range files {
		data, err := os.ReadFile(filepath.Join("testdata", "leases", name))
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(dir, filepath.Base(name))
		if err := os.WriteFile(dst, data, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(dst, mtime, mtime); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// noBus is a D-Bus address where nothing listens, so that Discover goes
// on to the lease files.
func noBus(t *testing.T) string {
	return "unix:path=" + filepath.Join(t.TempDir(), "no-bus")
}

func TestDiscoverLeases(t *testing.T) {
	now := time.Now()
	hourAgo := now.Add(-time.Hour)
	tests := []struct {
		name       string
		files      map[string]time.Time
		iface      string
		wantString string
		wantErr    string
		wantDrop   []string
	}{
		{
			name:       "dhclient ipv4 newer than ipv6",
			files:      map[string]time.Time{"dhcp/dhclient.leases": now, "dhcp/dhclient6.wlan0.leases": hourAgo},
			iface:      "wlan0",
			wantString: "192.0.2.53:53, 192.0.2.54:53, [2001:db8::53]:53, [fe80::1%wlan0]:53 search corp.example lab.corp.example from dhclient lease (DIR/dhclient.leases, DIR/dhclient6.wlan0.leases)",
			wantDrop:   []string{"127.0.0.53:53: loopback address, which is not reached out of wlan0"},
		},
		{
			name:       "dhclient never expiring",
			files:      map[string]time.Time{"dhcp/dhclient.leases": now},
			iface:      "eth0",
			wantString: "203.0.113.53:53 from dhclient lease (DIR/dhclient.leases)",
		},
		{
			name:    "dhclient expired",
			files:   map[string]time.Time{"dhcp/dhclient.leases": now},
			iface:   "wlan1",
			wantErr: "lease files: no DNS servers for the link",
		},
		{
			name:       "dhcpcd ipv4 and ipv6",
			files:      map[string]time.Time{"dhcpcd/wlan0.lease": now, "dhcpcd/wlan0.lease6": hourAgo},
			iface:      "wlan0",
			wantString: "192.0.2.53:53, 192.0.2.54:53, [2001:db8::53]:53, [fe80::1%wlan0]:53 search home.example corp.example lab.corp.example from dhcpcd lease (DIR/wlan0.lease, DIR/wlan0.lease6)",
		},
		{
			name:       "newest client wins",
			files:      map[string]time.Time{"dhcpcd/wlan0.lease": hourAgo, "dhcp/dhclient.leases": now},
			iface:      "wlan0",
			wantString: "192.0.2.53:53, 192.0.2.54:53 search corp.example lab.corp.example from dhclient lease (DIR/dhclient.leases)",
			wantDrop:   []string{"127.0.0.53:53: loopback address, which is not reached out of wlan0"},
		},
		{
			name:       "dhcpcd lease within its time",
			files:      map[string]time.Time{"dhcpcd/eth1.lease": now.Add(-30 * time.Second)},
			iface:      "eth1",
			wantString: "198.51.100.53:53 from dhcpcd lease (DIR/eth1.lease)",
		},
		{
			name:    "dhcpcd lease past its time",
			files:   map[string]time.Time{"dhcpcd/eth1.lease": now.Add(-2 * time.Minute)},
			iface:   "eth1",
			wantErr: "lease files: no DNS servers for the link",
		},
		{
			name:    "no lease for the interface",
			files:   map[string]time.Time{"dhcpcd/wlan0.lease": now},
			iface:   "wwan0",
			wantErr: "lease files: no DNS servers for the link",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := copyLeases(t, tt.files)
			cfg := DiscoverConfig{
				BusAddress: noBus(t),
				LeaseGlobs: []string{filepath.Join(dir, "dhclient*.leases"), filepath.Join(dir, "*.lease"), filepath.Join(dir, "*.lease6")},
			}
			l, err := Discover(t.Context(), cfg, tt.iface)
			if tt.wantErr != "" {
				if err == nil || !strings.HasSuffix(err.Error(), tt.wantErr) {
					t.Fatalf("Discover error = %v, want one ending %q", err, tt.wantErr)
				}
				if !strings.HasPrefix(err.Error(), "finding the DNS servers of "+tt.iface+": connecting to D-Bus: ") {
					t.Errorf("Discover error = %v, want it to name the interface and the D-Bus failure first", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Discover: %v", err)
			}
			if got := strings.ReplaceAll(l.String(), dir, "DIR"); got != tt.wantString {
				t.Errorf("Discover = %s\nwant       %s", got, tt.wantString)
			}
			if !slices.Equal(l.Dropped, tt.wantDrop) {
				t.Errorf("dropped %q, want %q", l.Dropped, tt.wantDrop)
			}
		})
	}
}

// startBus runs a private dbus-daemon for the test and returns its
// address. It fails the test when dbus-daemon (Debian package dbus-daemon)
// is missing.
func startBus(t *testing.T) string {
	t.Helper()
	daemon, err := exec.LookPath("dbus-daemon")
	if err != nil {
		t.Fatalf("dbus-daemon (Debian package dbus-daemon) is needed: %v", err)
	}
	dir := t.TempDir()
	config := filepath.Join(dir, "bus.conf")
	err = os.WriteFile(config, []byte(`<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=`+filepath.Join(dir, "bus")+`</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
`), 0o644)
	if err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(daemon, "--config-file="+config, "--nofork", "--nopidfile", "--print-address=1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = &testLogWriter{t: t}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting dbus-daemon: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	addr, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("reading the bus address: %v", err)
	}
	go io.Copy(io.Discard, stdout)
	return strings.TrimSpace(addr)
}

// fakeResolved is a stand-in for systemd-resolved: GetLink maps interface
// index 1 (lo) to one link object with DNSEx and Domains properties.
type fakeResolved struct {
	mu    sync.Mutex
	calls []int32
}

func (f *fakeResolved) GetLink(index int32) (dbus.ObjectPath, *dbus.Error) {
	f.mu.Lock()
	f.calls = append(f.calls, index)
	f.mu.Unlock()
	if index != 1 {
		return "", dbus.NewError("org.freedesktop.resolve1.NoSuchLink", []any{"no such link"})
	}
	return "/org/freedesktop/resolve1/link/_31", nil
}

// resolvedServer is one entry of the DNSEx property, a(iayqs).
type resolvedServer struct {
	Family  int32
	Address []byte
	Port    uint16
	Name    string
}

type resolvedDomain struct {
	Domain      string
	RoutingOnly bool
}

// serveResolved claims org.freedesktop.resolve1 on the bus at addr and
// returns the properties of link 1, which the test may change.
func serveResolved(t *testing.T, addr string, servers []resolvedServer) (*prop.Properties, *fakeResolved) {
	t.Helper()
	conn := connectBus(t, addr)
	f := &fakeResolved{}
	if err := conn.Export(f, resolvedPath, resolvedManager); err != nil {
		t.Fatal(err)
	}
	props, err := prop.Export(conn, "/org/freedesktop/resolve1/link/_31", prop.Map{
		resolvedLink: {
			"DNSEx":   {Value: servers, Emit: prop.EmitTrue},
			"Domains": {Value: []resolvedDomain{{"corp.example", false}, {"routing.example", true}}, Emit: prop.EmitTrue},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	claim(t, conn, resolvedName)
	return props, f
}

func connectBus(t *testing.T, addr string) *dbus.Conn {
	t.Helper()
	conn, err := dbus.Connect(addr)
	if err != nil {
		t.Fatalf("connecting to the test bus: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func claim(t *testing.T, conn *dbus.Conn, name string) {
	t.Helper()
	reply, err := conn.RequestName(name, dbus.NameFlagDoNotQueue)
	if err != nil || reply != dbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("claiming %s: reply %v, %v", name, reply, err)
	}
}

func v4(s string) []byte { return netip.MustParseAddr(s).AsSlice() }

func TestDiscoverResolvedOverDBus(t *testing.T) {
	addr := startBus(t)
	_, fake := serveResolved(t, addr, []resolvedServer{
		{Family: 2, Address: v4("192.0.2.53"), Port: 0},
		{Family: 10, Address: netip.MustParseAddr("fe80::53").AsSlice(), Port: 5353},
		{Family: 2, Address: v4("127.0.0.53")},
	})

	l, err := Discover(t.Context(), DiscoverConfig{BusAddress: addr, LeaseGlobs: []string{}}, "lo")
	if err != nil {
		t.Fatalf("Discover: %v", err)
	}
	if want := "192.0.2.53:53, [fe80::53%lo]:5353 search corp.example from systemd-resolved (link 1)"; l.String() != want {
		t.Errorf("Discover = %s\nwant       %s", l, want)
	}
	if want := []string{"127.0.0.53:53: loopback address, which is not reached out of lo"}; !slices.Equal(l.Dropped, want) {
		t.Errorf("dropped %q, want %q", l.Dropped, want)
	}
	fake.mu.Lock()
	calls := slices.Clone(fake.calls)
	fake.mu.Unlock()
	if !slices.Equal(calls, []int32{1}) {
		t.Errorf("GetLink calls %v, want [1]", calls)
	}
}

// fakeNM is a stand-in for NetworkManager with one device, lo.
type fakeNM struct{}

func (fakeNM) GetDeviceByIpIface(name string) (dbus.ObjectPath, *dbus.Error) {
	if name != "lo" {
		return "", dbus.NewError("org.freedesktop.NetworkManager.UnknownDevice", []any{"No device found for the requested iface."})
	}
	return "/org/freedesktop/NetworkManager/Devices/1", nil
}

func TestDiscoverNetworkManagerOverDBus(t *testing.T) {
	addr := startBus(t)
	conn := connectBus(t, addr)
	if err := conn.Export(fakeNM{}, nmPath, nmName); err != nil {
		t.Fatal(err)
	}
	exports := map[dbus.ObjectPath]prop.Map{
		"/org/freedesktop/NetworkManager/Devices/1": {nmDevice: {
			"Ip4Config": {Value: dbus.ObjectPath("/org/freedesktop/NetworkManager/IP4Config/3")},
			"Ip6Config": {Value: dbus.ObjectPath("/org/freedesktop/NetworkManager/IP6Config/3")},
		}},
		"/org/freedesktop/NetworkManager/IP4Config/3": {nmIP4Config: {
			"NameserverData": {Value: []map[string]dbus.Variant{{"address": dbus.MakeVariant("198.51.100.53")}}},
			"Searches":       {Value: []string{"corp.example"}},
			"Domains":        {Value: []string{"lab.example"}},
		}},
		"/org/freedesktop/NetworkManager/IP6Config/3": {nmIP6Config: {
			"Nameservers": {Value: [][]byte{netip.MustParseAddr("2001:db8::53").AsSlice()}},
			"Searches":    {Value: []string{}},
			"Domains":     {Value: []string{"corp.example"}},
		}},
	}
	for path, props := range exports {
		if _, err := prop.Export(conn, path, props); err != nil {
			t.Fatal(err)
		}
	}
	claim(t, conn, nmName)

	l, err := Discover(t.Context(), DiscoverConfig{BusAddress: addr, LeaseGlobs: []string{}}, "lo")
	if err != nil {
		t.Fatalf("Discover: %v", err)
	}
	want := "198.51.100.53:53, [2001:db8::53]:53 search corp.example lab.example from NetworkManager (/org/freedesktop/NetworkManager/Devices/1)"
	if l.String() != want {
		t.Errorf("Discover = %s\nwant       %s", l, want)
	}

	_, err = Discover(t.Context(), DiscoverConfig{BusAddress: addr, LeaseGlobs: []string{}}, "wwan9")
	if err == nil || !strings.Contains(err.Error(), "systemd-resolved: not running") || !strings.Contains(err.Error(), "No device found") {
		t.Errorf("Discover(wwan9) error = %v, want it to say resolved is not running and NetworkManager has no device", err)
	}
}

// TestWatcherFollowsResolved changes the stand-in's servers and checks that
// the watcher reports them from the PropertiesChanged signal alone, long
// before its periodic read.
func TestWatcherFollowsResolved(t *testing.T) {
	addr := startBus(t)
	props, _ := serveResolved(t, addr, []resolvedServer{{Family: 2, Address: v4("192.0.2.53")}})

	changes := make(chan LinkDNS, 8)
	w := NewWatcher(t.Context(), WatcherConfig{
		DiscoverConfig: DiscoverConfig{BusAddress: addr, LeaseGlobs: []string{}, Logger: testLogger(t)},
		Interfaces:     []string{"lo"},
		OnChange:       func(l LinkDNS) { changes <- l },
		Interval:       time.Hour,
		Debounce:       10 * time.Millisecond,
	})
	defer w.Close()

	first := <-changes
	if want := "192.0.2.53:53 search corp.example from systemd-resolved (link 1)"; first.String() != want {
		t.Fatalf("first report %s, want %s", first, want)
	}

	props.SetMust(resolvedLink, "DNSEx", []resolvedServer{{Family: 2, Address: v4("192.0.2.54")}, {Family: 2, Address: v4("192.0.2.55")}})
	select {
	case l := <-changes:
		if want := "192.0.2.54:53, 192.0.2.55:53 search corp.example from systemd-resolved (link 1)"; l.String() != want {
			t.Errorf("report after the change %s, want %s", l, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no report within 5 s of the change")
	}
	if l, ok := w.Link("lo"); !ok || !slices.Contains(l.Servers, netip.MustParseAddrPort("192.0.2.55:53")) {
		t.Errorf("Link(lo) = %s, %v; want the new servers", l, ok)
	}
}

// TestWatcherFollowsLeaseFile rewrites a lease and checks that the watcher
// reports the new servers from the inotify event alone.
func TestWatcherFollowsLeaseFile(t *testing.T) {
	dir := copyLeases(t, map[string]time.Time{"dhcpcd/eth1.lease": time.Now()})
	changes := make(chan LinkDNS, 8)
	w := NewWatcher(t.Context(), WatcherConfig{
		DiscoverConfig: DiscoverConfig{BusAddress: noBus(t), LeaseGlobs: []string{filepath.Join(dir, "*.lease")}, Logger: testLogger(t)},
		Interfaces:     []string{"eth1"},
		OnChange:       func(l LinkDNS) { changes <- l },
		Interval:       time.Hour,
		Debounce:       10 * time.Millisecond,
	})
	defer w.Close()
	if l := <-changes; len(l.Servers) != 1 || l.Servers[0].String() != "198.51.100.53:53" {
		t.Fatalf("first report %s, want 198.51.100.53:53", l)
	}

	data, err := os.ReadFile(filepath.Join(dir, "eth1.lease"))
	if err != nil {
		t.Fatal(err)
	}
	i := strings.Index(string(data), "\x06\x04\xc6\x33\x64\x35")
	if i < 0 {
		t.Fatal("fixture lacks its DNS option")
	}
	data[i+5] = 0x36 // 198.51.100.54
	if err := os.WriteFile(filepath.Join(dir, "eth1.lease"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	select {
	case l := <-changes:
		if want := "198.51.100.54:53 from dhcpcd lease (" + filepath.Join(dir, "eth1.lease") + ")"; l.String() != want {
			t.Errorf("report after the change %s, want %s", l, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no report within 5 s of the change")
	}
}
