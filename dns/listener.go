package dns

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	dnsmsg "github.com/miekg/dns"

	"iapd/internal/logkey"
)

// Exchange sends one query for (name, qtype) to r's servers, with the
// same timing as LookupNetIP but without search domains or the cache, and
// returns the server's reply: NOERROR or NXDOMAIN. name must be fully
// qualified. The system resolver answers only A and AAAA, with a TTL of
// systemTTL, since the host's resolver does not report one.
func (r *Resolver) Exchange(ctx context.Context, name string, qtype uint16) (*dnsmsg.Msg, error) {
	if !isValidHost(name) {
		return nil, ErrInvalidName
	}
	r.stats.lookups.Add(1)
	if r.system != nil {
		return r.exchangeSystem(ctx, name, qtype)
	}
	resp, err := r.exchange(ctx, dnsmsg.Fqdn(name), qtype)
	if err != nil {
		r.stats.failures.Add(1)
		return nil, &Error{Name: name, AccessPoint: r.name, Servers: r.Servers(), Err: err}
	}
	return resp, nil
}

// systemTTL is the TTL of answers made from the host resolver's results.
const systemTTL = 30

func (r *Resolver) exchangeSystem(ctx context.Context, name string, qtype uint16) (*dnsmsg.Msg, error) {
	resp := new(dnsmsg.Msg).SetQuestion(dnsmsg.Fqdn(name), qtype)
	resp.Response = true
	if qtype != dnsmsg.TypeA && qtype != dnsmsg.TypeAAAA {
		resp.Rcode = dnsmsg.RcodeNotImplemented
		return resp, nil
	}
	addrs, err := r.lookupSystem(ctx, strings.TrimSuffix(name, "."))
	if errors.Is(err, ErrNotFound) {
		resp.Rcode = dnsmsg.RcodeNameError
		return resp, nil
	}
	if err != nil {
		return nil, &Error{Name: name, AccessPoint: r.name, Err: err}
	}
	for _, a := range addrs {
		hdr := dnsmsg.RR_Header{Name: dnsmsg.Fqdn(name), Class: dnsmsg.ClassINET, Ttl: systemTTL}
		switch {
		case qtype == dnsmsg.TypeA && a.Is4():
			hdr.Rrtype = dnsmsg.TypeA
			resp.Answer = append(resp.Answer, &dnsmsg.A{Hdr: hdr, A: a.AsSlice()})
		case qtype == dnsmsg.TypeAAAA && a.Is6():
			hdr.Rrtype = dnsmsg.TypeAAAA
			resp.Answer = append(resp.Answer, &dnsmsg.AAAA{Hdr: hdr, AAAA: a.AsSlice()})
		}
	}
	return resp, nil
}

// ErrRefused is the error that ListenerConfig.Route returns, wrapped, for a
// name that the app's policy rejects.
var ErrRefused = errors.New("dns: refused by policy")

// ListenerConfig configures NewListener and Listener.Update.
type ListenerConfig struct {
	// App names the app the listener answers for, in logs.
	App string
	// Route returns the resolvers that may answer for key, in the order
	// to ask them: the resolvers of the usable access points of the
	// destination that the app's routes choose. key is the queried name
	// without its trailing dot, or, for a reverse lookup (PTR under
	// in-addr.arpa or ip6.arpa), the address it asks about, so that
	// address routes apply. An error wrapping ErrRefused is answered
	// REFUSED; other errors SERVFAIL.
	Route func(key string) (resolvers []*Resolver, names []string, err error)
	// Logger receives a Debug record per query; nil discards them.
	Logger *slog.Logger
	// Timeout bounds the answer to one query. Default 10 s.
	Timeout time.Duration
}

// Listener is a DNS server on loopback for one app: it answers each query
// through the resolvers that the app's routes choose for the name, so a
// program that resolves names itself sees the same split view as its
// proxied connections, and no name reaches servers its routes do not
// send it to. Create it with NewListener; it is safe for concurrent use.
type Listener struct {
	state   atomic.Pointer[listenerState] // replaced by Update
	servers []*dnsmsg.Server
	wg      sync.WaitGroup

	queries, refused, failed atomic.Uint64 // see ListenerStats
}

// ListenerStats counts the queries a Listener answered since it was
// created, over UDP and TCP. The counters only grow, and Update keeps
// them.
type ListenerStats struct {
	Queries uint64 // every query answered, whatever the reply's rcode
	Refused uint64 // of Queries, answered REFUSED because the app's policy rejects the name
	Failed  uint64 // of Queries, answered SERVFAIL because no resolver answered or none was usable
}

// Stats returns the counters of l.
func (l *Listener) Stats() ListenerStats {
	return ListenerStats{Queries: l.queries.Load(), Refused: l.refused.Load(), Failed: l.failed.Load()}
}

// listenerState is the state a Listener replies from: its configuration
// and the logger that names its app.
type listenerState struct {
	cfg ListenerConfig
	log *slog.Logger
}

// NewListener returns a listener that answers as cfg says. It panics when
// cfg.Route is nil.
func NewListener(cfg ListenerConfig) *Listener {
	l := &Listener{}
	l.state.Store(newListenerState(cfg))
	return l
}

func newListenerState(cfg ListenerConfig) *listenerState {
	if cfg.Route == nil {
		panic("dns.NewListener: nil Route")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &listenerState{cfg: cfg, log: log.With(logkey.Component, "dns-listener", logkey.App, cfg.App)}
}

// Update makes l answer as cfg says from the next query on, so that its
// sockets can pass to another app or policy without closing. Queries
// already being answered finish with the configuration they started with.
// It panics when cfg.Route is nil.
func (l *Listener) Update(cfg ListenerConfig) {
	l.state.Store(newListenerState(cfg))
}

// Serve answers queries that arrive on pc (UDP) and ln (TCP), which l
// owns from now on, until Close. Unlike most Serve methods it returns at
// once, when both sockets are being served. Call it once.
func (l *Listener) Serve(pc net.PacketConn, ln net.Listener) {
	address := ln.Addr().String()
	log := l.state.Load().log
	l.servers = []*dnsmsg.Server{
		{PacketConn: pc, Handler: l},
		{Listener: ln, Handler: l},
	}
	for _, srv := range l.servers {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		stopped := make(chan struct{})
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			defer close(stopped)
			if err := srv.ActivateAndServe(); err != nil {
				l.state.Load().log.Warn("DNS listener stopped", "address", address, logkey.Err, err)
			}
		}()
		// A server that fails before it starts never calls
		// NotifyStartedFunc.
		select {
		case <-started:
		case <-stopped:
		}
	}
	log.Info("DNS listener ready", "address", address)
}

// Close stops serving, waits for the queries being answered and closes
// the sockets.
func (l *Listener) Close() error {
	var errs []error
	for _, srv := range l.servers {
		if err := srv.Shutdown(); err != nil {
			errs = append(errs, err)
		}
	}
	l.wg.Wait()
	return errors.Join(errs...)
}

// ServeDNS answers one query; it implements miekg/dns's Handler.
func (l *Listener) ServeDNS(w dnsmsg.ResponseWriter, req *dnsmsg.Msg) {
	resp := l.answer(req)
	if err := w.WriteMsg(resp); err != nil {
		l.state.Load().log.Debug("writing DNS reply failed", logkey.Err, err)
	}
}

func (l *Listener) answer(req *dnsmsg.Msg) *dnsmsg.Msg {
	l.queries.Add(1)
	st := l.state.Load()
	resp := new(dnsmsg.Msg)
	resp.SetReply(req)
	resp.RecursionAvailable = true
	if req.Opcode != dnsmsg.OpcodeQuery || len(req.Question) != 1 {
		resp.Rcode = dnsmsg.RcodeNotImplemented
		return resp
	}
	q := req.Question[0]
	if q.Qclass != dnsmsg.ClassINET {
		resp.Rcode = dnsmsg.RcodeNotImplemented
		return resp
	}

	key := strings.ToLower(strings.TrimSuffix(q.Name, "."))
	if addr, ok := reverseAddr(key); ok {
		key = addr.String()
	}
	resolvers, names, err := st.cfg.Route(key)
	if err != nil {
		resp.Rcode = dnsmsg.RcodeServerFailure
		if errors.Is(err, ErrRefused) {
			resp.Rcode = dnsmsg.RcodeRefused
			l.refused.Add(1)
		} else {
			l.failed.Add(1)
		}
		st.log.Info("DNS query not answered", logkey.Target, q.Name, "type", dnsmsg.TypeToString[q.Qtype], logkey.Err, err)
		return resp
	}

	ctx, cancel := context.WithTimeout(context.Background(), st.cfg.Timeout)
	defer cancel()
	var errs []error
	for i, r := range resolvers {
		up, err := r.Exchange(ctx, q.Name, q.Qtype)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		st.log.Debug("DNS query answered", logkey.Target, q.Name, "type", dnsmsg.TypeToString[q.Qtype],
			logkey.AccessPoint, names[i], "rcode", dnsmsg.RcodeToString[up.Rcode])
		resp.Rcode = up.Rcode
		resp.Answer = up.Answer
		resp.Ns = up.Ns
		for _, rr := range up.Extra {
			if rr.Header().Rrtype != dnsmsg.TypeOPT {
				resp.Extra = append(resp.Extra, rr)
			}
		}
		return resp
	}
	st.log.Info("DNS query failed", logkey.Target, q.Name, "type", dnsmsg.TypeToString[q.Qtype], logkey.Err, errors.Join(errs...))
	l.failed.Add(1)
	resp.Rcode = dnsmsg.RcodeServerFailure
	return resp
}

// reverseAddr returns the address that a reverse lookup name (without its
// trailing dot) asks about: d.c.b.a.in-addr.arpa, or 32 nibbles under
// ip6.arpa (RFC 3596).
func reverseAddr(name string) (netip.Addr, bool) {
	if rest, ok := strings.CutSuffix(name, ".in-addr.arpa"); ok {
		labels := strings.Split(rest, ".")
		if len(labels) != 4 {
			return netip.Addr{}, false
		}
		addr, err := netip.ParseAddr(labels[3] + "." + labels[2] + "." + labels[1] + "." + labels[0])
		return addr, err == nil
	}
	if rest, ok := strings.CutSuffix(name, ".ip6.arpa"); ok {
		labels := strings.Split(rest, ".")
		if len(labels) != 32 {
			return netip.Addr{}, false
		}
		var b strings.Builder
		for i := 31; i >= 0; i-- {
			if len(labels[i]) != 1 {
				return netip.Addr{}, false
			}
			b.WriteString(labels[i])
			if i%4 == 0 && i > 0 {
				b.WriteByte(':')
			}
		}
		addr, err := netip.ParseAddr(b.String())
		return addr, err == nil
	}
	return netip.Addr{}, false
}
