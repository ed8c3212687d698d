package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"iapd/dns"

	dnsmsg "github.com/miekg/dns"
)

// dnsTTL is the TTL of every answer of the benchmark's DNS server, long
// enough that no cached answer expires during a run.
const dnsTTL = 300

// dnsServer answers every A question with 127.0.0.1 and every AAAA
// question with ::1, over UDP on loopback.
type dnsServer struct {
	addr    netip.AddrPort
	server  *dnsmsg.Server
	queries atomic.Uint64
}

func startDNSServer() (*dnsServer, error) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("opening DNS server socket on 127.0.0.1: %w", err)
	}
	s := &dnsServer{addr: pc.LocalAddr().(*net.UDPAddr).AddrPort()}
	started := make(chan struct{})
	s.server = &dnsmsg.Server{
		PacketConn:        pc,
		Handler:           dnsmsg.HandlerFunc(s.answer),
		NotifyStartedFunc: func() { close(started) },
	}
	failed := make(chan error, 1)
	go func() { failed <- s.server.ActivateAndServe() }()
	select {
	case <-started:
		return s, nil
	case err := <-failed:
		pc.Close()
		return nil, fmt.Errorf("starting DNS server: %w", err)
	}
}

func (s *dnsServer) answer(w dnsmsg.ResponseWriter, req *dnsmsg.Msg) {
	s.queries.Add(1)
	reply := new(dnsmsg.Msg)
	reply.SetReply(req)
	for _, q := range req.Question {
		hdr := dnsmsg.RR_Header{Name: q.Name, Rrtype: q.Qtype, Class: dnsmsg.ClassINET, Ttl: dnsTTL}
		switch q.Qtype {
		case dnsmsg.TypeA:
			reply.Answer = append(reply.Answer, &dnsmsg.A{Hdr: hdr, A: net.IPv4(127, 0, 0, 1)})
		case dnsmsg.TypeAAAA:
			reply.Answer = append(reply.Answer, &dnsmsg.AAAA{Hdr: hdr, AAAA: net.IPv6loopback})
		}
	}
	w.WriteMsg(reply)
}

func (s *dnsServer) close() { s.server.Shutdown() }

// lookupFunc resolves one name; worker and seq make names unique where the
// measure needs that.
type lookupFunc func(ctx context.Context, worker int, seq int) error

// measureDNS measures cached and uncached lookups per second of the
// resolver iapd gives an access point, and of Go's own resolver (which
// has no cache) against the same server as the baseline.
func measureDNS(ctx context.Context, opts *options, env *environment, res *results) error {
	const cachedName = "cached.bench.test"
	goResolver := &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, env.dns.addr.String())
		},
	}

	for r := range opts.repeat {
		// A new resolver per repeat, so that each starts with an empty
		// cache.
		own := dns.New(dns.Config{Name: "bench", Servers: []netip.AddrPort{env.dns.addr}})
		if _, err := own.LookupNetIP(ctx, cachedName); err != nil {
			return fmt.Errorf("resolving %s with package dns: %w", cachedName, err)
		}
		if _, err := goResolver.LookupNetIP(ctx, "ip", cachedName+"."); err != nil {
			return fmt.Errorf("resolving %s with net.Resolver: %w", cachedName, err)
		}

		runs := []struct {
			measure, column string
			lookup          lookupFunc
		}{
			{"cached name", columnOwnResolver, func(ctx context.Context, _, _ int) error {
				_, err := own.LookupNetIP(ctx, cachedName)
				return err
			}},
			{"distinct names", columnOwnResolver, func(ctx context.Context, w, i int) error {
				_, err := own.LookupNetIP(ctx, fmt.Sprintf("n%d-%d-%d.bench.test", r, w, i))
				return err
			}},
			// net.Resolver has no cache, so its "cached name" run shows
			// what the cache of package dns saves.
			{"cached name", columnGoResolver, func(ctx context.Context, _, _ int) error {
				_, err := goResolver.LookupNetIP(ctx, "ip", cachedName+".")
				return err
			}},
			{"distinct names", columnGoResolver, func(ctx context.Context, w, i int) error {
				_, err := goResolver.LookupNetIP(ctx, "ip", fmt.Sprintf("g%d-%d-%d.bench.test.", r, w, i))
				return err
			}},
		}
		for _, run := range runs {
			queriesBefore := env.dns.queries.Load()
			lookups, elapsed, errs, firstErr := runLookups(ctx, opts.dnsWorkers, opts.dnsDuration, run.lookup)
			if err := ctx.Err(); err != nil {
				return err
			}
			if errs > 0 {
				res.addError(sectionDNS, run.measure, run.column, "lookups/s", errs, firstErr)
			}
			if lookups == 0 {
				return fmt.Errorf("resolver %s, %s: no lookup succeeded: %w", run.column, run.measure, firstErr)
			}
			res.add(sectionDNS, run.measure, run.column, "lookups/s", float64(lookups)/elapsed.Seconds())
			queries := float64(env.dns.queries.Load() - queriesBefore)
			res.add(sectionDNS, run.measure+": queries per lookup", run.column, "", queries/float64(lookups))
		}
	}
	return nil
}

// runLookups calls lookup from workers goroutines until duration has
// passed, and returns the successful lookups, the time until the last
// one ended, and the failures.
func runLookups(ctx context.Context, workers int, duration time.Duration, lookup lookupFunc) (lookups int, elapsed time.Duration, errs int, firstErr error) {
	var (
		mu    sync.Mutex // protects errs and firstErr
		count atomic.Int64
		wg    sync.WaitGroup
	)
	start := time.Now()
	end := start.Add(duration)
	for w := range workers {
		wg.Go(func() {
			for i := 0; time.Now().Before(end) && ctx.Err() == nil; i++ {
				if err := lookup(ctx, w, i); err != nil {
					mu.Lock()
					errs++
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					continue
				}
				count.Add(1)
			}
		})
	}
	wg.Wait()
	return int(count.Load()), time.Since(start), errs, firstErr
}
