package dns

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"

	"github.com/godbus/dbus/v5"
)

// D-Bus names of systemd-resolved (org.freedesktop.resolve1(5)) and
// NetworkManager (its D-Bus API reference, "org.freedesktop.NetworkManager").
const (
	resolvedName     = "org.freedesktop.resolve1"
	resolvedPath     = "/org/freedesktop/resolve1"
	resolvedManager  = "org.freedesktop.resolve1.Manager"
	resolvedLink     = "org.freedesktop.resolve1.Link"
	nmName           = "org.freedesktop.NetworkManager"
	nmPath           = "/org/freedesktop/NetworkManager"
	nmDevice         = "org.freedesktop.NetworkManager.Device"
	nmIP4Config      = "org.freedesktop.NetworkManager.IP4Config"
	nmIP6Config      = "org.freedesktop.NetworkManager.IP6Config"
	dbusProperties   = "org.freedesktop.DBus.Properties"
	dbusNameHasOwner = "org.freedesktop.DBus.NameHasOwner"
)

// busClient asks systemd-resolved and NetworkManager over one D-Bus
// connection.
type busClient struct {
	conn *dbus.Conn
}

// dialBus connects to the bus at address, or to the system bus when
// address is empty.
func dialBus(address string) (*busClient, error) {
	var conn *dbus.Conn
	var err error
	if address == "" {
		conn, err = dbus.ConnectSystemBus()
	} else {
		conn, err = dbus.Connect(address)
	}
	if err != nil {
		return nil, fmt.Errorf("connecting to D-Bus: %w", err)
	}
	return &busClient{conn: conn}, nil
}

func (b *busClient) close() { b.conn.Close() }

// errBusBroken wraps failures of the connection itself, after which the
// discoverer dials again.
var errBusBroken = errors.New("D-Bus connection failed")

func isBusBroken(err error) bool { return errors.Is(err, errBusBroken) }

// hasOwner reports whether a service owns name on the bus.
func (b *busClient) hasOwner(ctx context.Context, name string) (bool, error) {
	var owned bool
	err := b.conn.BusObject().CallWithContext(ctx, dbusNameHasOwner, 0, name).Store(&owned)
	if err != nil {
		return false, fmt.Errorf("%w: asking for %s: %w", errBusBroken, name, err)
	}
	return owned, nil
}

// resolved returns the per-link servers and search domains that
// systemd-resolved has for the interface called name.
func (b *busClient) resolved(ctx context.Context, name string) (LinkDNS, error) {
	l := LinkDNS{Source: SourceResolved}
	if ok, err := b.hasOwner(ctx, resolvedName); err != nil || !ok {
		return l, cmpErr(err, fmt.Errorf("%s: not running", SourceResolved))
	}
	index, err := interfaceIndex(name)
	if err != nil {
		return l, fmt.Errorf("%s: %w", SourceResolved, err)
	}

	var path dbus.ObjectPath
	err = b.conn.Object(resolvedName, resolvedPath).CallWithContext(ctx, resolvedManager+".GetLink", 0, int32(index)).Store(&path)
	if err != nil {
		return l, fmt.Errorf("%s: GetLink(%d): %w", SourceResolved, index, err)
	}
	link := b.conn.Object(resolvedName, path)
	l.Detail = "link " + strconv.Itoa(index)

	// DNSEx carries ports and came with systemd 246; DNS is the fallback.
	if v, err := link.GetProperty(resolvedLink + ".DNSEx"); err == nil {
		var servers []struct {
			Family  int32
			Address []byte
			Port    uint16
			Name    string
		}
		if err := dbus.Store([]any{v.Value()}, &servers); err != nil {
			return l, fmt.Errorf("%s: reading DNSEx: %w", SourceResolved, err)
		}
		for _, s := range servers {
			if ap, ok := addrPort(s.Address, s.Port); ok {
				l.Servers = append(l.Servers, ap)
			}
		}
	} else {
		v, err := link.GetProperty(resolvedLink + ".DNS")
		if err != nil {
			return l, fmt.Errorf("%s: reading DNS of link %d: %w", SourceResolved, index, err)
		}
		var servers []struct {
			Family  int32
			Address []byte
		}
		if err := dbus.Store([]any{v.Value()}, &servers); err != nil {
			return l, fmt.Errorf("%s: reading DNS: %w", SourceResolved, err)
		}
		for _, s := range servers {
			if ap, ok := addrPort(s.Address, 53); ok {
				l.Servers = append(l.Servers, ap)
			}
		}
	}

	if v, err := link.GetProperty(resolvedLink + ".Domains"); err == nil {
		var domains []struct {
			Domain      string
			RoutingOnly bool
		}
		if err := dbus.Store([]any{v.Value()}, &domains); err == nil {
			for _, d := range domains {
				// Routing-only domains (~corp.example) choose the link for
				// a name but are not appended to single-label names.
				if !d.RoutingOnly {
					l.Search = append(l.Search, d.Domain)
				}
			}
		}
	}
	if len(l.Servers) == 0 {
		return l, fmt.Errorf("%s: %w", SourceResolved, errNoLinkDNS)
	}
	return l, nil
}

// networkManager returns the servers and search domains of the IPv4 and
// IPv6 configuration that NetworkManager applied to the interface called
// name.
func (b *busClient) networkManager(ctx context.Context, name string) (LinkDNS, error) {
	l := LinkDNS{Source: SourceNetworkManager}
	if ok, err := b.hasOwner(ctx, nmName); err != nil || !ok {
		return l, cmpErr(err, fmt.Errorf("%s: not running", SourceNetworkManager))
	}

	var device dbus.ObjectPath
	err := b.conn.Object(nmName, nmPath).CallWithContext(ctx, nmName+".GetDeviceByIpIface", 0, name).Store(&device)
	if err != nil {
		return l, fmt.Errorf("%s: GetDeviceByIpIface(%q): %w", SourceNetworkManager, name, err)
	}
	l.Detail = string(device)
	dev := b.conn.Object(nmName, device)

	if path, ok := objectPathProperty(dev, nmDevice+".Ip4Config"); ok {
		cfg := b.conn.Object(nmName, path)
		l.Servers = append(l.Servers, nmIPv4Servers(cfg)...)
		l.Search = append(l.Search, nmSearch(cfg, nmIP4Config)...)
	}
	if path, ok := objectPathProperty(dev, nmDevice+".Ip6Config"); ok {
		cfg := b.conn.Object(nmName, path)
		if v, err := cfg.GetProperty(nmIP6Config + ".Nameservers"); err == nil {
			var servers [][]byte
			if dbus.Store([]any{v.Value()}, &servers) == nil {
				for _, s := range servers {
					if ap, ok := addrPort(s, 53); ok {
						l.Servers = append(l.Servers, ap)
					}
				}
			}
		}
		l.Search = append(l.Search, nmSearch(cfg, nmIP6Config)...)
	}
	if len(l.Servers) == 0 {
		return l, fmt.Errorf("%s: %w", SourceNetworkManager, errNoLinkDNS)
	}
	return l, nil
}

// nmIPv4Servers reads NameserverData, and the older Nameservers (IPv4
// addresses as uint32 in network byte order) when that is missing.
func nmIPv4Servers(cfg dbus.BusObject) []netip.AddrPort {
	var out []netip.AddrPort
	if v, err := cfg.GetProperty(nmIP4Config + ".NameserverData"); err == nil {
		var data []map[string]dbus.Variant
		if dbus.Store([]any{v.Value()}, &data) == nil {
			for _, entry := range data {
				text, _ := entry["address"].Value().(string)
				if addr, err := netip.ParseAddr(text); err == nil {
					out = append(out, netip.AddrPortFrom(addr, 53))
				}
			}
			return out
		}
	}
	if v, err := cfg.GetProperty(nmIP4Config + ".Nameservers"); err == nil {
		var raw []uint32
		if dbus.Store([]any{v.Value()}, &raw) == nil {
			for _, n := range raw {
				// The bytes are in network order inside a host-order
				// integer, so the low byte is the first octet.
				addr := netip.AddrFrom4([4]byte{byte(n), byte(n >> 8), byte(n >> 16), byte(n >> 24)})
				out = append(out, netip.AddrPortFrom(addr, 53))
			}
		}
	}
	return out
}

// nmSearch returns a configuration's search domains: Searches, then the
// connection's Domains.
func nmSearch(cfg dbus.BusObject, iface string) []string {
	var out []string
	for _, prop := range []string{".Searches", ".Domains"} {
		v, err := cfg.GetProperty(iface + prop)
		if err != nil {
			continue
		}
		var list []string
		if dbus.Store([]any{v.Value()}, &list) == nil {
			out = append(out, list...)
		}
	}
	return out
}

func objectPathProperty(obj dbus.BusObject, prop string) (dbus.ObjectPath, bool) {
	v, err := obj.GetProperty(prop)
	if err != nil {
		return "", false
	}
	path, ok := v.Value().(dbus.ObjectPath)
	return path, ok && path != "/" && path.IsValid()
}

// addrPort builds a server address from its bytes; port 0 means 53, as
// systemd-resolved reports a server without a port.
func addrPort(b []byte, port uint16) (netip.AddrPort, bool) {
	addr, ok := netip.AddrFromSlice(b)
	if !ok {
		return netip.AddrPort{}, false
	}
	if port == 0 {
		port = 53
	}
	return netip.AddrPortFrom(addr.Unmap(), port), true
}

// cmpErr returns err when it is set, else fallback.
func cmpErr(err, fallback error) error {
	if err != nil {
		return err
	}
	return fallback
}

// watchBus subscribes to the signals of systemd-resolved and
// NetworkManager on a connection of its own and calls kick on each. It
// returns a function that ends the subscription.
func watchBus(address string, kick func()) (func(), error) {
	b, err := dialBus(address)
	if err != nil {
		return nil, err
	}
	for _, sender := range []string{resolvedName, nmName} {
		if err := b.conn.AddMatchSignal(dbus.WithMatchSender(sender)); err != nil {
			b.close()
			return nil, fmt.Errorf("subscribing to %s: %w", sender, err)
		}
	}
	// A service that starts or restarts has new links and configuration.
	if err := b.conn.AddMatchSignal(dbus.WithMatchInterface("org.freedesktop.DBus"), dbus.WithMatchMember("NameOwnerChanged")); err != nil {
		b.close()
		return nil, fmt.Errorf("subscribing to NameOwnerChanged: %w", err)
	}

	signals := make(chan *dbus.Signal, 16)
	b.conn.Signal(signals)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for sig := range signals {
			if sig.Name == "org.freedesktop.DBus.NameOwnerChanged" {
				if len(sig.Body) == 0 {
					continue
				}
				if name, _ := sig.Body[0].(string); name != resolvedName && name != nmName {
					continue
				}
			}
			kick()
		}
	}()
	return func() {
		b.close() // closes signals, which ends the goroutine
		<-done
	}, nil
}
