package cli

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"iapd/admin"
	"iapd/iface"
	"iapd/internal/event"
	"iapd/internal/logkey"
	"iapd/policy"
	"iapd/proxy"
)

// daemon is a running iapd: the policy being served, the interface
// manager, the proxy with its listeners, and the control API. It
// implements admin.Daemon.
type daemon struct {
	logger     *slog.Logger
	started    time.Time
	bus        *event.Bus
	links      *iface.Manager
	network    *network
	health     *iface.Health
	supervisor *supervisor
	proxy      *proxy.Server
	usage      *admin.Usage
	metrics    *admin.Metrics
	watcher    *admin.Watcher
	admin      *admin.Server
	socket     string // path of the control socket; "" when there is none

	pol atomic.Pointer[policy.Policy]

	reloadMu     sync.Mutex         // serializes reloads and protects the fields below
	listeners    []*openListener    // in the order of the policy's listeners
	dnsListeners []*openDNSListener // by app name
	web          net.Listener       // the control HTTP listener; nil when there is none
	webAddr      string             // control.http that web was opened for
	serving      sync.WaitGroup     // goroutines serving listeners
}

// openListener is a policy listener and the socket it accepts on.
type openListener struct {
	l   *policy.Listener
	ln  net.Listener
	key string // normalized address; see listenKey
}

// daemonOptions are the settings of "iapd run" outside the policy.
type daemonOptions struct {
	socket string // overrides control.socket when not empty
}

// startDaemon sets up interfaces, listeners and the control API for pol
// and starts serving. On error everything it set up is undone.
func startDaemon(pol *policy.Policy, opts daemonOptions, logger *slog.Logger) (_ *daemon, err error) {
	d := &daemon{logger: logger, started: time.Now(), bus: event.NewBus()}
	d.pol.Store(pol)
	defer func() {
		if err != nil {
			d.close()
		}
	}()

	d.links, err = iface.NewManager(iface.ManagerConfig{Policy: pol, Logger: logger})
	if err != nil {
		return nil, fmt.Errorf("setting up interfaces: %w", err)
	}

	d.proxy = proxy.NewServer(proxy.Config{
		Network:          (*daemonNetwork)(d),
		Logger:           logger,
		HandshakeTimeout: pol.Limits.HandshakeTimeout,
		DialTimeout:      pol.Limits.DialTimeout,
		IdleTimeout:      pol.Limits.IdleTimeout,
		MaxHeaderBytes:   pol.Limits.MaxHeaderBytes,
		AuthFailureDelay: pol.Limits.AuthFailureDelay,
		IsHostAddr:       func(a netip.Addr) bool { return d.links.Snapshot().HasAddr(a) },
		OnClose:          func(c proxy.ConnInfo) { d.usage.Closed(c) },
		OnDialAttempt: func(a proxy.DialAttempt) {
			d.usage.DialAttempt(a)
			d.metrics.DialAttempt(a)
		},
	})
	d.usage = admin.NewUsage(d.proxy.Conns)
	d.metrics = admin.NewMetrics(d, d.usage, d.bus, Version)
	d.network = newNetwork(pol, d.links, d.metrics, logger)
	d.health = d.network.startHealth(pol, d.proxy.DialGateway, logger)

	// Events flow from here on: interface changes from the monitor, and
	// access point changes from the health, which the supervisor turns
	// into events, destination switches and closed connections.
	d.watcher = admin.NewWatcher(d.bus, d.metrics, d.Policy, logger)
	d.links.Monitor().RegisterChangeCallback(d.watcher.Changed)
	d.supervisor = newSupervisor(pol, d.watcher.Publish, d.network.conditions.Load, d.proxy.CloseConns)
	d.health.RegisterChangeCallback(d.supervisor.accessPointChanged)
	d.supervisor.evaluate()
	logUsability(logger, pol, d.health)

	// Every socket, proxy and DNS, is opened before any is served, so that
	// a busy port stops the start instead of leaving a half-running daemon.
	// A reload that the control API takes in meanwhile waits until they
	// are served. The lock is released before d.close runs on an error.
	d.reloadMu.Lock()
	defer d.reloadMu.Unlock()
	plan := planListeners(nil, nil, pol, logger)
	if err := plan.open(); err != nil {
		return nil, err
	}
	d.listeners, d.dnsListeners = plan.next, plan.dnsNext
	d.admin = admin.New(admin.Config{
		Daemon:  d,
		Bus:     d.bus,
		Version: Version,
		Started: d.started,
		Usage:   d.usage,
		Metrics: d.metrics,
		Logger:  logger,
	})
	if err := d.openControl(pol, opts); err != nil {
		return nil, err
	}
	if err := d.openWeb(pol.Control.HTTP); err != nil {
		return nil, err
	}

	plan.apply(d, &admin.ReloadReport{})
	return d, nil
}

// openControl creates the control socket and serves the API on it.
func (d *daemon) openControl(pol *policy.Policy, opts daemonOptions) error {
	path := cmp.Or(opts.socket, pol.Control.Socket)
	if path == "" {
		var err error
		path, err = admin.DefaultSocketPath()
		if err != nil {
			d.logger.Warn("control API disabled", logkey.Err, err)
			return nil
		}
	}
	ln, err := admin.ListenSocket(path, pol.Control.SocketMode)
	if err != nil {
		return err
	}
	d.socket = path
	d.serving.Go(func() {
		if err := d.admin.Serve(ln, d.admin.ControlHandler()); err != nil {
			d.logger.Error("control socket stopped", logkey.Err, err)
		}
	})
	d.logger.Info("control API listening", "socket", path, "mode", fmt.Sprintf("%04o", pol.Control.SocketMode))
	return nil
}

// openWeb opens the HTTP listener for metrics, the status page and the PAC
// file at addr, closing the one open before; "" closes it only.
func (d *daemon) openWeb(addr string) error {
	if addr == d.webAddr {
		return nil
	}
	var ln net.Listener
	if addr != "" {
		var err error
		ln, err = net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("opening control HTTP listener %s: %w", addr, err)
		}
	}
	d.swapWeb(ln, addr)
	return nil
}

// swapWeb serves ln, which may be nil, in place of the HTTP listener open
// now.
func (d *daemon) swapWeb(ln net.Listener, addr string) {
	if d.web != nil {
		d.web.Close()
	}
	d.web, d.webAddr = ln, addr
	if ln == nil {
		return
	}
	d.serving.Go(func() {
		if err := d.admin.Serve(ln, d.admin.WebHandler()); err != nil && !errors.Is(err, net.ErrClosed) {
			d.logger.Error("control HTTP listener stopped", logkey.Err, err)
		}
	})
	d.logger.Info("serving metrics and the status page", "address", ln.Addr().String())
}

func (d *daemon) serve(ol *openListener) {
	d.serving.Go(func() {
		if err := d.proxy.Serve(ol.ln, ol.l); err != nil {
			d.logger.Error("listener stopped", logkey.Listener, ol.ln.Addr().String(), logkey.Err, err)
		}
	})
}

// shutdown stops accepting, waits up to drain for open connections to end,
// closes the rest and removes iapd's routing tables, rules and socket.
func (d *daemon) shutdown(drain time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	open := len(d.proxy.Conns())
	d.logger.Info("draining connections", "open", open, "timeout", drain)
	if err := d.proxy.Shutdown(ctx); errors.Is(err, context.DeadlineExceeded) {
		d.logger.Warn("connections still open after the drain timeout were closed", "timeout", drain)
	} else if err != nil {
		d.logger.Warn("closing the proxy", logkey.Err, err)
	}
	d.close()
}

// close releases everything startDaemon set up.
func (d *daemon) close() {
	if d.proxy != nil {
		d.proxy.Close()
	}
	if d.network != nil {
		d.network.close()
	}
	if d.admin != nil {
		d.admin.Close()
	}
	d.reloadMu.Lock()
	for _, ol := range d.listeners {
		ol.ln.Close()
	}
	for _, od := range d.dnsListeners {
		od.close()
	}
	if d.web != nil {
		d.web.Close()
	}
	d.reloadMu.Unlock()
	d.serving.Wait()
	if d.socket != "" {
		os.Remove(d.socket)
	}
	if d.supervisor != nil {
		d.supervisor.stop()
	}
	if d.health != nil {
		d.health.Close()
	}
	if d.links != nil {
		if err := d.links.Close(); err != nil {
			d.logger.Error("removing routing tables and rules failed", logkey.Err, err)
		}
	}
}

// Reload loads the policy file again and applies it. See reload.go.
func (d *daemon) Reload() (*admin.ReloadReport, error) {
	d.reloadMu.Lock()
	defer d.reloadMu.Unlock()
	notifySystemd(reloadingState())
	defer notifySystemd("READY=1")

	report, err := d.reloadLocked()
	d.metrics.Reloaded(err == nil)
	if err != nil {
		d.logger.Error("policy rejected; serving the previous one", "policy", d.Policy().Path, logkey.Err, err)
		d.bus.Publish(event.Event{Kind: event.PolicyRejected, Reason: firstLine(err.Error())})
		return nil, err
	}
	d.logger.Info("policy reloaded", "policy", report.Policy.Path, "hash", shortHash(report.Policy.Hash),
		"changed", report.Changed, "listeners_added", len(report.ListenersAdded),
		"listeners_removed", len(report.ListenersRemoved), "dns_listeners_added", len(report.DNSListenersAdded),
		"dns_listeners_removed", len(report.DNSListenersRemoved), "connections_closed", report.ConnectionsClosed)
	d.bus.Publish(event.Event{Kind: event.PolicyReloaded, Reason: "sha256 " + shortHash(report.Policy.Hash)})
	return report, nil
}

// admin.Daemon methods.

func (d *daemon) Policy() *policy.Policy                  { return d.pol.Load() }
func (d *daemon) Snapshot() *iface.Snapshot               { return d.links.Snapshot() }
func (d *daemon) Conditions() policy.Conditions           { return d.network.Conditions() }
func (d *daemon) Interface(ap *policy.AccessPoint) string { return d.network.Interface(ap) }
func (d *daemon) Conns() []proxy.ConnInfo                 { return d.proxy.Conns() }
func (d *daemon) CloseConn(id uint64) bool                { return d.proxy.CloseConn(id) }
func (d *daemon) ListenerAddr(l *policy.Listener) string  { return d.listenerAddr(l) }

// Listeners returns the proxy and DNS listeners that the last start or
// reload left open. It reads counters the sockets keep anyway, so a
// status request costs the connections nothing.
func (d *daemon) Listeners() ([]admin.OpenListener, []admin.DNSListenerStatus) {
	d.reloadMu.Lock()
	defer d.reloadMu.Unlock()
	open := make([]admin.OpenListener, 0, len(d.listeners))
	for _, ol := range d.listeners {
		// A listener added a moment ago may not be served yet: its
		// counters are zero then.
		stats, _ := d.proxy.ListenerStats(ol.ln)
		open = append(open, admin.OpenListener{Listener: ol.l, Address: ol.ln.Addr().String(), Stats: stats})
	}
	dnsOpen := make([]admin.DNSListenerStatus, 0, len(d.dnsListeners))
	for _, od := range d.dnsListeners {
		st := admin.DNSListenerStatus{
			App:        od.app.Name,
			Listen:     od.addr,
			UDPAddress: od.pc.LocalAddr().String(),
			TCPAddress: od.ln.Addr().String(),
		}
		if od.dl != nil {
			stats := od.dl.Stats()
			st.Queries, st.Refused, st.Failed = stats.Queries, stats.Refused, stats.Failed
		}
		dnsOpen = append(dnsOpen, st)
	}
	return open, dnsOpen
}

func (d *daemon) listenerAddr(l *policy.Listener) string {
	d.reloadMu.Lock()
	defer d.reloadMu.Unlock()
	for _, ol := range d.listeners {
		if ol.l == l {
			return ol.ln.Addr().String()
		}
	}
	return ""
}

// daemonNetwork is the daemon as the proxy's Network. The network is
// created after the proxy, which needs the network only once it serves.
type daemonNetwork daemon

func (n *daemonNetwork) Conditions() policy.Conditions { return n.network.Conditions() }
func (n *daemonNetwork) ReportDial(ap *policy.AccessPoint, err error) {
	n.network.ReportDial(ap, err)
}
func (n *daemonNetwork) Dialer(ap *policy.AccessPoint) proxy.Dialer {
	return n.network.Dialer(ap)
}
func (n *daemonNetwork) Resolver(ap *policy.AccessPoint) proxy.Resolver {
	return n.network.Resolver(ap)
}
func (n *daemonNetwork) Interface(ap *policy.AccessPoint) string { return n.network.Interface(ap) }

// listenKey returns a listen address in a form where two spellings of the
// same address are equal ("localhost:1080" and "127.0.0.1:1080"), so that a
// reload keeps the socket of a listener whose address did not change.
func listenKey(listen string) string {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return listen
	}
	switch host {
	case "localhost":
		host = "127.0.0.1"
	case "":
		host = "::"
	}
	if addr, err := netip.ParseAddr(host); err == nil {
		host = addr.Unmap().String()
	}
	return net.JoinHostPort(host, port)
}

func shortHash(h string) string {
	if len(h) > 12 {
		return h[:12]
	}
	return h
}

func firstLine(s string) string {
	first, rest, _ := strings.Cut(s, "\n")
	if rest != "" {
		return first + fmt.Sprintf(" (and %d more)", strings.Count(rest, "\n")+1)
	}
	return first
}

// logUsability logs at start which access points are usable, and why the
// others are not.
func logUsability(logger *slog.Logger, pol *policy.Policy, health *iface.Health) {
	for _, ap := range pol.AccessPointOrder {
		st := health.Status(ap)
		if st.Usable {
			logger.Info("access point usable", logkey.AccessPoint, ap.Name, logkey.Interface, st.Link.Interface)
			continue
		}
		logger.Info("access point not usable yet", logkey.AccessPoint, ap.Name, logkey.Interface, st.Link.Interface, "reason", st.Reason)
	}
}
