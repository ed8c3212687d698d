package dns

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"testing"

	dnsmsg "github.com/miekg/dns"
)

// startBenchServer starts a loopback server for benchmarks, which have no
// use for query logs.
func startBenchServer(b *testing.B) netip.AddrPort {
	b.Helper()
	z := &testZone{records: make(map[string][]dnsmsg.RR)}
	for _, text := range testZoneRecords {
		rr, err := dnsmsg.NewRR(text)
		if err != nil {
			b.Fatal(err)
		}
		z.records[rr.Header().Name] = append(z.records[rr.Header().Name], rr)
	}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &dnsmsg.Server{PacketConn: pc, Handler: z.handler()}
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	go srv.ActivateAndServe()
	<-started
	b.Cleanup(func() { srv.Shutdown() })
	return pc.LocalAddr().(*net.UDPAddr).AddrPort()
}

func benchmarkLookup(b *testing.B, cacheSize int) {
	server := startBenchServer(b)
	r := New(Config{Name: "bench", Servers: []netip.AddrPort{server}, CacheSize: cacheSize, Logger: slog.New(slog.DiscardHandler)})
	ctx := context.Background()
	if _, err := r.LookupNetIP(ctx, "www.example.test"); err != nil {
		b.Fatal(err)
	}

	b.ReportAllocs()
	for b.Loop() {
		if _, err := r.LookupNetIP(ctx, "www.example.test"); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkLookupCached(b *testing.B) { benchmarkLookup(b, 0) }

// BenchmarkLookupUncached has the cache disabled, so each lookup sends
// A and AAAA to the loopback server.
func BenchmarkLookupUncached(b *testing.B) { benchmarkLookup(b, -1) }
