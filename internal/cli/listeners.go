package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"syscall"

	"iapd/admin"
	"iapd/dns"
	"iapd/internal/logkey"
	"iapd/policy"
	"iapd/proxy"
)

// openDNSListener is the DNS listener of an app and the sockets it
// answers on.
type openDNSListener struct {
	app  *policy.App
	addr string         // app.DNSListen as the policy compiles it, like "127.0.0.1:5353"
	pc   net.PacketConn // UDP
	ln   net.Listener   // TCP
	dl   *dns.Listener  // serves pc and ln; nil until apply starts it
}

// close closes the sockets of od, through its listener once one serves
// them.
func (od *openDNSListener) close() error {
	if od.dl != nil {
		return od.dl.Close()
	}
	var errs []error
	if od.pc != nil {
		errs = append(errs, od.pc.Close())
	}
	if od.ln != nil {
		errs = append(errs, od.ln.Close())
	}
	return errors.Join(errs...)
}

// listenerPlan is the change a reload makes to the proxy and DNS
// listeners: the sockets that stay with a new policy listener, those that
// close and those that open. At start every listener is an added one.
type listenerPlan struct {
	next    []*openListener // the new policy's listeners, in its order
	added   []*openListener // of next, those whose sockets are new
	removed []*openListener // old listeners that no new one matches

	dnsNext    []*openDNSListener // the new policy's DNS listeners, by app name
	dnsAdded   []*openDNSListener // of dnsNext, those whose sockets are new
	dnsRemoved []*openDNSListener // old DNS listeners that no new one matches

	shared []syscall.Conn // old sockets that open set SO_REUSEPORT on; abort clears it
	logger *slog.Logger
}

// planListeners matches the listeners of p with the open ones by address.
// Listeners with the same address are matched in order, which pairs
// several port-0 listeners on one host up one to one. A DNS listener
// whose address passes to another app keeps its sockets too, and answers
// for the new app once applied.
func planListeners(open []*openListener, openDNS []*openDNSListener, p *policy.Policy, logger *slog.Logger) *listenerPlan {
	plan := &listenerPlan{logger: logger}
	free := slices.Clone(open)
	for _, l := range p.Listeners {
		key := listenKey(l.Listen)
		i := slices.IndexFunc(free, func(ol *openListener) bool { return ol != nil && ol.key == key })
		if i < 0 {
			ol := &openListener{l: l, key: key}
			plan.next = append(plan.next, ol)
			plan.added = append(plan.added, ol)
			continue
		}
		plan.next = append(plan.next, &openListener{l: l, ln: free[i].ln, key: key})
		free[i] = nil
	}
	for _, ol := range free {
		if ol != nil {
			plan.removed = append(plan.removed, ol)
		}
	}

	freeDNS := slices.Clone(openDNS)
	for _, name := range slices.Sorted(maps.Keys(p.Apps)) {
		app := p.Apps[name]
		if app.DNSListen == "" {
			continue
		}
		i := slices.IndexFunc(freeDNS, func(od *openDNSListener) bool { return od != nil && od.addr == app.DNSListen })
		if i < 0 {
			od := &openDNSListener{app: app, addr: app.DNSListen}
			plan.dnsNext = append(plan.dnsNext, od)
			plan.dnsAdded = append(plan.dnsAdded, od)
			continue
		}
		old := freeDNS[i]
		plan.dnsNext = append(plan.dnsNext, &openDNSListener{app: app, addr: old.addr, pc: old.pc, ln: old.ln, dl: old.dl})
		freeDNS[i] = nil
	}
	for _, od := range freeDNS {
		if od != nil {
			plan.dnsRemoved = append(plan.dnsRemoved, od)
		}
	}
	return plan
}

// open opens the sockets of the added listeners, proxy and DNS, or none of
// them.
func (plan *listenerPlan) open() error {
	for _, ol := range plan.added {
		lc, err := plan.listenConfig("tcp", ol.l.Listen, proxy.ListenConfig())
		if err == nil {
			ol.ln, err = lc.Listen(context.Background(), "tcp", ol.l.Listen)
		}
		if err != nil {
			plan.abort()
			return fmt.Errorf("opening listener %s: %w", ol.l.Listen, err)
		}
	}
	for _, od := range plan.dnsAdded {
		if err := plan.openDNS(od); err != nil {
			plan.abort()
			return fmt.Errorf("opening DNS listener %s of app %s: %w", od.addr, od.app.Name, err)
		}
	}
	return nil
}

// openDNS opens the UDP and the TCP socket of od, or neither.
func (plan *listenerPlan) openDNS(od *openDNSListener) error {
	ctx := context.Background()
	lc, err := plan.listenConfig("udp", od.addr, &net.ListenConfig{})
	if err != nil {
		return err
	}
	pc, err := lc.ListenPacket(ctx, "udp", od.addr)
	if err != nil {
		return err
	}
	lc, err = plan.listenConfig("tcp", od.addr, &net.ListenConfig{})
	if err == nil {
		od.ln, err = lc.Listen(ctx, "tcp", od.addr)
	}
	if err != nil {
		pc.Close()
		return err
	}
	od.pc = pc
	return nil
}

// listenConfig returns lc for a new socket of network ("tcp" or "udp") on
// address. When the socket would collide with one that this plan closes,
// it returns a copy of lc that sets SO_REUSEPORT. Such a collision comes
// from a listener that moves from 127.0.0.1:1080 to 0.0.0.0:1080, or from
// a port that passes from a proxy listener to a DNS listener.
//
// Linux lets two sockets bind overlapping addresses when both have
// SO_REUSEPORT and the same owner (socket(7)). So the old socket gets the
// option too and keeps serving until apply closes it. At every moment one
// of the two accepts, and a rejected reload leaves the old one as it was.
// Closing the old socket first and opening it again on failure would
// instead refuse clients in between, and would lose the port for good if
// another process took it meanwhile. Another daemon cannot take the port
// by accident, because it would have to set SO_REUSEPORT itself and run
// as iapd's user. The new socket keeps the option, so that a later reload
// can move it again. While both sockets are open, the kernel gives a new
// connection to the one with the more specific address, and spreads
// connections to two equal addresses over both.
func (plan *listenerPlan) listenConfig(network, address string, lc *net.ListenConfig) (*net.ListenConfig, error) {
	old := overlapping(plan.closing(), network, address)
	if len(old) == 0 {
		return lc, nil
	}
	for _, s := range old {
		if err := plan.share(s.conn); err != nil {
			return nil, fmt.Errorf("%s overlaps %s, which this reload closes, and cannot share its port with it: %w; reload once without the listener and once with it, or restart iapd",
				address, s.addr, err)
		}
	}
	shared := *lc
	shared.Control = withReusePort(lc.Control)
	return &shared, nil
}

// share sets SO_REUSEPORT on c, an open socket of a removed listener,
// once.
func (plan *listenerPlan) share(c syscall.Conn) error {
	if c == nil {
		return errors.New("the socket has no file descriptor")
	}
	if slices.Contains(plan.shared, c) {
		return nil
	}
	if err := setReusePort(c, true); err != nil {
		return err
	}
	plan.shared = append(plan.shared, c)
	return nil
}

// closingSocket is an open socket of a listener that a plan removes.
type closingSocket struct {
	network string // "tcp" or "udp"
	addr    netip.AddrPort
	conn    syscall.Conn // nil when the socket offers none
}

// closing returns the sockets of the removed proxy and DNS listeners.
func (plan *listenerPlan) closing() []closingSocket {
	var out []closingSocket
	add := func(network string, addr net.Addr, c any) {
		conn, _ := c.(syscall.Conn)
		out = append(out, closingSocket{network: network, addr: socketAddr(addr), conn: conn})
	}
	for _, ol := range plan.removed {
		add("tcp", ol.ln.Addr(), ol.ln)
	}
	for _, od := range plan.dnsRemoved {
		add("udp", od.pc.LocalAddr(), od.pc)
		add("tcp", od.ln.Addr(), od.ln)
	}
	return out
}

// overlapping returns the sockets of closing that a new socket of network
// on address would collide with: the same port, and addresses that
// overlap as policy.ListenOverlaps has it. With port 0 the kernel picks a
// free port, so such a socket collides with none.
func overlapping(closing []closingSocket, network, address string) []closingSocket {
	ap, err := netip.ParseAddrPort(listenKey(address))
	if err != nil || ap.Port() == 0 {
		return nil
	}
	var out []closingSocket
	for _, s := range closing {
		if s.network == network && s.addr.Port() == ap.Port() && policy.ListenOverlaps(s.addr.Addr(), ap.Addr()) {
			out = append(out, s)
		}
	}
	return out
}

// socketAddr returns the local address of a TCP or UDP socket, with an
// IPv4 address in its 4-byte form.
func socketAddr(a net.Addr) netip.AddrPort {
	var ap netip.AddrPort
	switch a := a.(type) {
	case *net.TCPAddr:
		ap = a.AddrPort()
	case *net.UDPAddr:
		ap = a.AddrPort()
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// abort closes the sockets that open opened and takes SO_REUSEPORT off the
// old sockets again.
func (plan *listenerPlan) abort() {
	for _, ol := range plan.added {
		if ol.ln != nil {
			ol.ln.Close()
			ol.ln = nil
		}
	}
	for _, od := range plan.dnsAdded {
		od.close()
		od.pc, od.ln = nil, nil
	}
	for _, c := range plan.shared {
		if err := setReusePort(c, false); err != nil {
			plan.logger.Warn("clearing SO_REUSEPORT on a listener the rejected reload kept failed", logkey.Err, err)
		}
	}
	plan.shared = nil
}

// apply hands the kept sockets their new policy listeners, serves the
// added ones and retires the removed ones, whose connections drain. DNS
// listeners are handled alike: a kept one answers for its new app from
// the next query on, and a removed one closes once its queries in flight
// are answered. d.listeners and d.dnsListeners become those now open.
func (plan *listenerPlan) apply(d *daemon, report *admin.ReloadReport) {
	for _, ol := range plan.next {
		if slices.Contains(plan.added, ol) {
			d.serve(ol)
			report.ListenersAdded = append(report.ListenersAdded, ol.l.Listen)
			continue
		}
		if err := d.proxy.Update(ol.ln, ol.l); err != nil {
			// The socket is open and served, so this is a programming error.
			d.logger.Error("updating listener failed", logkey.Listener, ol.l.Listen, logkey.Err, err, "unexpected", true)
		}
		report.ListenersKept = append(report.ListenersKept, ol.l.Listen)
	}
	for _, ol := range plan.removed {
		if err := d.proxy.Retire(ol.ln); err != nil {
			d.logger.Error("retiring listener failed", logkey.Listener, ol.l.Listen, logkey.Err, err)
		}
		report.ListenersRemoved = append(report.ListenersRemoved, ol.l.Listen)
	}
	d.listeners = plan.next

	for _, od := range plan.dnsNext {
		cfg := d.network.dnsListenerConfig(od.app)
		if od.dl == nil {
			od.dl = dns.NewListener(cfg)
			od.dl.Serve(od.pc, od.ln)
			report.DNSListenersAdded = append(report.DNSListenersAdded, od.addr)
			continue
		}
		od.dl.Update(cfg)
		report.DNSListenersKept = append(report.DNSListenersKept, od.addr)
	}
	for _, od := range plan.dnsRemoved {
		if err := od.close(); err != nil {
			d.logger.Warn("closing DNS listener failed", logkey.App, od.app.Name, "address", od.addr, logkey.Err, err)
		} else {
			d.logger.Info("DNS listener closed", logkey.App, od.app.Name, "address", od.addr)
		}
		report.DNSListenersRemoved = append(report.DNSListenersRemoved, od.addr)
	}
	d.dnsListeners = plan.dnsNext
}
