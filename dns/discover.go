package dns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"iapd/internal/logkey"
)

// Sources of a link's DNS servers, as LinkDNS.Source names them.
const (
	SourceResolved       = "systemd-resolved"
	SourceNetworkManager = "NetworkManager"
	SourceDhclient       = "dhclient lease"
	SourceDhcpcd         = "dhcpcd lease"
)

// errNoLinkDNS means a source has no servers for the link.
var errNoLinkDNS = errors.New("no DNS servers for the link")

// LinkDNS is the DNS configuration that the system has for one link.
type LinkDNS struct {
	Interface string
	Servers   []netip.AddrPort // in the order the source gives; link-local ones carry the interface as zone
	Search    []string         // search domains, without trailing dots
	Source    string           // one of the Source constants
	Detail    string           // the file the servers came from, or the D-Bus object; for logs and explain
	Dropped   []string         // servers left out, each with the reason
}

// Equal reports whether l and o have the same servers, search domains and
// source.
func (l LinkDNS) Equal(o LinkDNS) bool {
	return l.Interface == o.Interface && slices.Equal(l.Servers, o.Servers) && slices.Equal(l.Search, o.Search) &&
		l.Source == o.Source && l.Detail == o.Detail
}

// String returns l in one line, like
// "192.0.2.53:53, [2001:db8::53]:53 search corp.example from systemd-resolved (link 3)".
func (l LinkDNS) String() string {
	var b strings.Builder
	for i, s := range l.Servers {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(s.String())
	}
	if len(l.Servers) == 0 {
		b.WriteString("no servers")
	}
	if len(l.Search) > 0 {
		b.WriteString(" search ")
		b.WriteString(strings.Join(l.Search, " "))
	}
	if l.Source != "" {
		b.WriteString(" from ")
		b.WriteString(l.Source)
		if l.Detail != "" {
			b.WriteString(" (" + l.Detail + ")")
		}
	}
	return b.String()
}

// DiscoverConfig says where Discover and Watcher look. The zero value
// looks in the usual places of Debian and Fedora.
type DiscoverConfig struct {
	// BusAddress is the D-Bus address of systemd-resolved and
	// NetworkManager. Empty means the system bus (DBUS_SYSTEM_BUS_ADDRESS,
	// else /run/dbus/system_bus_socket).
	BusAddress string
	// LeaseGlobs are the patterns of dhclient and dhcpcd lease files. Nil
	// means DefaultLeaseGlobs.
	LeaseGlobs []string
	// Logger receives the records of discovery; nil discards them.
	Logger *slog.Logger
}

// DefaultLeaseGlobs are where dhclient and dhcpcd keep their leases on
// Debian, Fedora and Arch, and where NetworkManager keeps those of the
// dhclient it runs.
var DefaultLeaseGlobs = []string{
	"/var/lib/dhcp/dhclient*.leases",
	"/var/lib/dhclient/*.lease",
	"/var/lib/dhclient/*.leases",
	"/var/lib/NetworkManager/dhclient*.lease",
	"/var/lib/dhcpcd/*.lease",
	"/var/lib/dhcpcd/*.lease6",
	"/var/db/dhcpcd/*.lease",
	"/var/db/dhcpcd/*.lease6",
}

func (c DiscoverConfig) leaseGlobs() []string {
	if c.LeaseGlobs == nil {
		return DefaultLeaseGlobs
	}
	return c.LeaseGlobs
}

// Discover returns the DNS configuration the system has for the interface
// called name, from the first source that has servers for it:
// systemd-resolved, then NetworkManager (both over D-Bus), then the newest
// unexpired dhclient lease, then the dhcpcd lease. It never reads
// /etc/resolv.conf, which holds whatever the last DHCP client wrote.
func Discover(ctx context.Context, cfg DiscoverConfig, name string) (LinkDNS, error) {
	d := newDiscoverer(cfg)
	defer d.close()
	return d.discover(ctx, name)
}

// discoverer holds the D-Bus connection between lookups.
type discoverer struct {
	cfg DiscoverConfig
	log *slog.Logger
	bus *busClient // nil until first needed, and after the bus failed
}

func newDiscoverer(cfg DiscoverConfig) *discoverer {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &discoverer{cfg: cfg, log: log.With(logkey.Component, "dns-discovery")}
}

func (d *discoverer) close() {
	if d.bus != nil {
		d.bus.close()
		d.bus = nil
	}
}

func (d *discoverer) discover(ctx context.Context, name string) (LinkDNS, error) {
	var errs []error
	if bus, err := d.busClient(); err != nil {
		errs = append(errs, err)
	} else {
		for _, source := range []func(context.Context, string) (LinkDNS, error){bus.resolved, bus.networkManager} {
			l, err := source(ctx, name)
			if err == nil {
				return finishLinkDNS(l, name), nil
			}
			errs = append(errs, err)
			if isBusBroken(err) {
				d.bus.close()
				d.bus = nil
				break
			}
		}
	}

	l, err := leaseDNS(d.cfg.leaseGlobs(), name, time.Now())
	if err == nil {
		return finishLinkDNS(l, name), nil
	}
	errs = append(errs, err)
	return LinkDNS{Interface: name}, fmt.Errorf("finding the DNS servers of %s: %w", name, errors.Join(errs...))
}

func (d *discoverer) busClient() (*busClient, error) {
	if d.bus != nil {
		return d.bus, nil
	}
	bus, err := dialBus(d.cfg.BusAddress)
	if err != nil {
		return nil, err
	}
	d.bus = bus
	return bus, nil
}

// finishLinkDNS gives link-local servers the interface as zone and drops
// loopback ones: a stub resolver on this host forwards through whichever
// interface it chooses, so names could leak through another interface.
func finishLinkDNS(l LinkDNS, name string) LinkDNS {
	l.Interface = name
	var kept []netip.AddrPort
	for _, s := range l.Servers {
		addr := s.Addr().Unmap()
		switch {
		case addr.IsLoopback():
			l.Dropped = append(l.Dropped, s.String()+": loopback address, which is not reached out of "+name)
			continue
		case addr.IsUnspecified() || addr.IsMulticast():
			l.Dropped = append(l.Dropped, s.String()+": not a unicast address")
			continue
		case addr.Is6() && addr.IsLinkLocalUnicast():
			addr = addr.WithZone(name)
		}
		ap := netip.AddrPortFrom(addr, s.Port())
		if !slices.Contains(kept, ap) {
			kept = append(kept, ap)
		}
	}
	l.Servers = kept

	var search []string
	for _, s := range l.Search {
		s = strings.ToLower(strings.Trim(s, "."))
		if s != "" && !slices.Contains(search, s) {
			search = append(search, s)
		}
	}
	l.Search = search
	return l
}

// WatcherConfig configures NewWatcher.
type WatcherConfig struct {
	DiscoverConfig
	// Interfaces are the names of the links to follow.
	Interfaces []string
	// OnChange is called with a link's configuration whenever it changed,
	// and once for each link after the first discovery. It is called from
	// one goroutine at a time and must not block for long.
	OnChange func(LinkDNS)
	// Interval is how often the sources are read again even without a
	// change notification. Default 30 s.
	Interval time.Duration
	// Debounce is how long the watcher waits after a notification for
	// more before it reads the sources. Default 200 ms.
	Debounce time.Duration
}

// Watcher follows the DNS configuration of links: it reads the sources
// when systemd-resolved or NetworkManager signal a change on D-Bus, when a
// lease file changes, and every Interval, and reports links whose
// configuration changed. Create it with NewWatcher and stop it with Close.
type Watcher struct {
	cfg     WatcherConfig
	d       *discoverer
	log     *slog.Logger
	kick    chan struct{}
	stop    chan struct{}
	done    chan struct{}
	closeMu sync.Once

	mu    sync.Mutex
	links map[string]LinkDNS // guarded by mu; last configuration reported
}

// NewWatcher discovers the configuration of every interface in cfg once,
// reports it through OnChange before returning, and then follows changes
// in the background.
func NewWatcher(ctx context.Context, cfg WatcherConfig) *Watcher {
	if cfg.Interval <= 0 {
		cfg.Interval = 30 * time.Second
	}
	if cfg.Debounce <= 0 {
		cfg.Debounce = 200 * time.Millisecond
	}
	w := &Watcher{
		cfg:   cfg,
		d:     newDiscoverer(cfg.DiscoverConfig),
		kick:  make(chan struct{}, 1),
		stop:  make(chan struct{}),
		done:  make(chan struct{}),
		links: make(map[string]LinkDNS),
	}
	w.log = w.d.log
	w.refresh(ctx)

	unwatch := w.watchSources()
	go func() {
		defer close(w.done)
		defer unwatch()
		w.loop()
	}()
	return w
}

// Link returns the configuration last found for the interface called name.
func (w *Watcher) Link(name string) (LinkDNS, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	l, ok := w.links[name]
	return l, ok
}

// Refresh asks the watcher to read the sources again soon, as after an
// interface came back.
func (w *Watcher) Refresh() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// Close stops the watcher and waits for its goroutine.
func (w *Watcher) Close() {
	w.closeMu.Do(func() { close(w.stop) })
	<-w.done
	w.d.close()
}

func (w *Watcher) loop() {
	ticker := time.NewTicker(w.cfg.Interval)
	defer ticker.Stop()
	for {
		select {
		case <-w.stop:
			return
		case <-ticker.C:
		case <-w.kick:
			// Notifications come in bursts: a DHCP renewal rewrites the
			// lease and changes the link's properties one by one.
			select {
			case <-time.After(w.cfg.Debounce):
			case <-w.stop:
				return
			}
			drain(w.kick)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		w.refresh(ctx)
		cancel()
	}
}

func drain(c chan struct{}) {
	for {
		select {
		case <-c:
		default:
			return
		}
	}
}

// refresh reads every link's configuration and reports those that changed.
func (w *Watcher) refresh(ctx context.Context) {
	for _, name := range w.cfg.Interfaces {
		l, err := w.d.discover(ctx, name)
		w.mu.Lock()
		old, seen := w.links[name]
		changed := !seen || !old.Equal(l)
		w.links[name] = l
		w.mu.Unlock()
		if !changed {
			continue
		}

		if err != nil {
			w.log.Warn("no DNS servers found for link", logkey.Interface, name, logkey.Err, err)
		} else {
			w.log.Info("DNS servers found for link", logkey.Interface, name,
				"servers", l.Servers, "search", l.Search, "source", l.Source, "detail", l.Detail)
		}
		for _, drop := range l.Dropped {
			w.log.Warn("DNS server of link left out", logkey.Interface, name, "server", drop)
		}
		if w.cfg.OnChange != nil {
			w.cfg.OnChange(l)
		}
	}
}

// interfaceIndex returns the index of the interface called name.
var interfaceIndex = func(name string) (int, error) {
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return 0, err
	}
	return ifc.Index, nil
}

// watchSources starts the notifications that make the watcher read the
// sources again, and returns a function that stops them. A source that
// cannot be watched is logged and left to the periodic reads.
func (w *Watcher) watchSources() func() {
	var stops []func()
	if stop, err := watchBus(w.cfg.BusAddress, w.Refresh); err != nil {
		w.log.Debug("not watching D-Bus for DNS changes", logkey.Err, err)
	} else {
		stops = append(stops, stop)
	}
	if stop, err := watchLeaseDirs(w.cfg.leaseGlobs(), w.Refresh); err != nil {
		w.log.Warn("not watching lease files for DNS changes", logkey.Err, err)
	} else {
		stops = append(stops, stop)
	}
	return func() {
		for _, stop := range stops {
			stop()
		}
	}
}
