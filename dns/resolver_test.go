package dns

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	dnsmsg "github.com/miekg/dns"
)

// newTestResolver returns a resolver named "cell" for servers, with a
// counting Dial and a logger writing through t.Log unless cfg sets them.
func newTestResolver(t *testing.T, cfg Config, servers ...*testServer) (*Resolver, *countingDial) {
	t.Helper()
	dial := &countingDial{}
	for _, s := range servers {
		cfg.Servers = append(cfg.Servers, s.addr)
	}
	if cfg.Name == "" {
		cfg.Name = "cell"
	}
	if cfg.Dial == nil {
		cfg.Dial = dial.Dial
	}
	cfg.Logger = testLogger(t)
	return New(cfg), dial
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

func addrsOf(t *testing.T, texts ...string) []netip.Addr {
	t.Helper()
	var out []netip.Addr
	for _, text := range texts {
		out = append(out, netip.MustParseAddr(text))
	}
	return out
}

// wwwAddrs are the addresses of www.example.test in LookupNetIP order.
var wwwAddrs = []string{"192.0.2.1", "192.0.2.2", "2001:db8::1"}

func TestLookupFirstServerOnly(t *testing.T) {
	z := newZone(t, testZoneRecords...)
	first := startServer(t, "127.0.0.1", z.handler())
	second := startServer(t, "::1", z.handler())
	r, _ := newTestResolver(t, Config{Timeouts: []time.Duration{time.Second, time.Second}}, first, second)

	addrs, err := r.LookupNetIP(t.Context(), "www.example.test")
	if err != nil {
		t.Fatalf("LookupNetIP: %v", err)
	}
	if want := addrsOf(t, wwwAddrs...); !slices.Equal(addrs, want) {
		t.Errorf("addresses = %v, want %v (IPv4 first)", addrs, want)
	}
	if got, want := sorted(first.QueryStrings()), []string{"udp www.example.test. A", "udp www.example.test. AAAA"}; !slices.Equal(got, want) {
		t.Errorf("first server queries = %q, want %q", got, want)
	}
	if got := second.QueryStrings(); len(got) != 0 {
		t.Errorf("second server queries = %q, want none", got)
	}
}

func TestLookupSilentFirstServer(t *testing.T) {
	z := newZone(t, testZoneRecords...)
	first := startServer(t, "127.0.0.1", silent)
	// The delay lets the first server's second-round query arrive before
	// the answer ends the exchange, so its query log is predictable.
	second := startServer(t, "::1", z.delayed(30*time.Millisecond))
	timeouts := []time.Duration{50 * time.Millisecond, 500 * time.Millisecond}
	r, _ := newTestResolver(t, Config{Timeouts: timeouts}, first, second)

	start := time.Now()
	addrs, err := r.LookupNetIP(t.Context(), "www.example.test")
	elapsed := time.Since(start)
	if err != nil {
		t.Fatalf("LookupNetIP: %v", err)
	}
	if want := addrsOf(t, wwwAddrs...); !slices.Equal(addrs, want) {
		t.Errorf("addresses = %v, want %v", addrs, want)
	}
	if elapsed < timeouts[0] || elapsed >= timeouts[0]+timeouts[1] {
		t.Errorf("lookup took %v, want between %v and %v", elapsed, timeouts[0], timeouts[0]+timeouts[1])
	}

	wantFirst := []string{"udp www.example.test. A", "udp www.example.test. A", "udp www.example.test. AAAA", "udp www.example.test. AAAA"}
	if got := sorted(first.QueryStrings()); !slices.Equal(got, wantFirst) {
		t.Errorf("first server queries = %q, want %q (asked in both rounds)", got, wantFirst)
	}
	wantSecond := []string{"udp www.example.test. A", "udp www.example.test. AAAA"}
	if got := sorted(second.QueryStrings()); !slices.Equal(got, wantSecond) {
		t.Errorf("second server queries = %q, want %q (asked in the second round only)", got, wantSecond)
	}
}

func TestLookupFailingServerMovesOn(t *testing.T) {
	z := newZone(t, testZoneRecords...)
	tests := []struct {
		name       string
		first      dnsmsg.HandlerFunc
		second     dnsmsg.HandlerFunc
		wantAddrs  []string
		wantErr    string // with %[1]s and %[2]s for the two servers
		wantFirst  [2]int // minimum and maximum A queries at the first server
		wantSecond int    // A queries at the second server
	}{
		{
			name:       "servfail",
			first:      rcodeHandler(dnsmsg.RcodeServerFailure),
			second:     z.handler(),
			wantAddrs:  wwwAddrs,
			wantFirst:  [2]int{1, 2},
			wantSecond: 1,
		},
		{
			name:       "refused",
			first:      rcodeHandler(dnsmsg.RcodeRefused),
			second:     z.handler(),
			wantAddrs:  wwwAddrs,
			wantFirst:  [2]int{1, 2},
			wantSecond: 1,
		},
		{
			name:       "every server fails",
			first:      rcodeHandler(dnsmsg.RcodeServerFailure),
			second:     rcodeHandler(dnsmsg.RcodeRefused),
			wantErr:    `resolving "www.example.test" via access point "cell" with servers %[1]s, %[2]s: dns: no server answered: querying %[1]s: server returned SERVFAIL`,
			wantFirst:  [2]int{3, 3},
			wantSecond: 2,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			first := startServer(t, "127.0.0.1", tt.first)
			second := startServer(t, "::1", tt.second)
			// Waits this long would fail the time check if a failed round
			// were waited out.
			timeouts := []time.Duration{2 * time.Second, 2 * time.Second, 2 * time.Second}
			r, _ := newTestResolver(t, Config{Timeouts: timeouts}, first, second)

			start := time.Now()
			addrs, err := r.LookupNetIP(t.Context(), "www.example.test")
			if elapsed := time.Since(start); elapsed > time.Second {
				t.Errorf("lookup took %v, want a prompt move to the next round", elapsed)
			}

			if tt.wantErr != "" {
				want := fmt.Sprintf(tt.wantErr, first.addr, second.addr)
				if err == nil || err.Error() != want {
					t.Errorf("error = %v, want %s", err, want)
				}
				if !errors.Is(err, ErrNoAnswer) {
					t.Errorf("error %v does not wrap ErrNoAnswer", err)
				}
			} else {
				if err != nil {
					t.Fatalf("LookupNetIP: %v", err)
				}
				if want := addrsOf(t, tt.wantAddrs...); !slices.Equal(addrs, want) {
					t.Errorf("addresses = %v, want %v", addrs, want)
				}
			}

			// A failed round ends only when each of its queries got its
			// failure, so with no answer the counts are exact. An answer
			// from the second server may end the exchange before the
			// first server's second query is sent.
			if got := first.count("udp", dnsmsg.TypeA); got < tt.wantFirst[0] || got > tt.wantFirst[1] {
				t.Errorf("first server got %d A queries, want %d to %d", got, tt.wantFirst[0], tt.wantFirst[1])
			}
			if got := second.count("udp", dnsmsg.TypeA); got != tt.wantSecond {
				t.Errorf("second server got %d A queries, want %d", got, tt.wantSecond)
			}
		})
	}
}

func TestLookupNoAnswerAfterLastWait(t *testing.T) {
	first := startServer(t, "127.0.0.1", silent)
	second := startServer(t, "::1", silent)
	timeouts := []time.Duration{30 * time.Millisecond, 60 * time.Millisecond}
	r, _ := newTestResolver(t, Config{Timeouts: timeouts}, first, second)

	start := time.Now()
	_, err := r.LookupNetIP(t.Context(), "www.example.test")
	elapsed := time.Since(start)

	want := fmt.Sprintf(`resolving "www.example.test" via access point "cell" with servers %s, %s: dns: no server answered`, first.addr, second.addr)
	if err == nil || err.Error() != want {
		t.Errorf("error = %v, want %s", err, want)
	}
	if !errors.Is(err, ErrNoAnswer) {
		t.Errorf("error %v does not wrap ErrNoAnswer", err)
	}
	var lookupErr *Error
	if !errors.As(err, &lookupErr) {
		t.Fatalf("error %T is not *Error", err)
	}
	if want := []netip.AddrPort{first.addr, second.addr}; !slices.Equal(lookupErr.Servers, want) {
		t.Errorf("Error.Servers = %v, want %v", lookupErr.Servers, want)
	}
	if elapsed < timeouts[0]+timeouts[1] {
		t.Errorf("lookup took %v, want at least the sum of the waits %v", elapsed, timeouts[0]+timeouts[1])
	}
	if got := first.count("udp", dnsmsg.TypeA); got != 2 {
		t.Errorf("first server got %d A queries, want 2", got)
	}
	if got := second.count("udp", dnsmsg.TypeA); got != 1 {
		t.Errorf("second server got %d A queries, want 1", got)
	}
	if got := r.Stats().Failures; got != 1 {
		t.Errorf("Stats().Failures = %d, want 1", got)
	}
}

func TestLookupTruncatedRetriesTCP(t *testing.T) {
	z := newZone(t, testZoneRecords...)
	server := startServer(t, "127.0.0.1", func(w dnsmsg.ResponseWriter, req *dnsmsg.Msg) {
		if w.LocalAddr().Network() == "udp" {
			resp := new(dnsmsg.Msg).SetReply(req)
			resp.Truncated = true
			w.WriteMsg(resp)
			return
		}
		w.WriteMsg(z.reply(req))
	})
	r, dial := newTestResolver(t, Config{}, server)

	addrs, err := r.LookupNetIP(t.Context(), "www.example.test")
	if err != nil {
		t.Fatalf("LookupNetIP: %v", err)
	}
	if want := addrsOf(t, wwwAddrs...); !slices.Equal(addrs, want) {
		t.Errorf("addresses = %v, want %v", addrs, want)
	}

	wantQueries := []string{"tcp www.example.test. A", "tcp www.example.test. AAAA", "udp www.example.test. A", "udp www.example.test. AAAA"}
	if got := sorted(server.QueryStrings()); !slices.Equal(got, wantQueries) {
		t.Errorf("server queries = %q, want %q", got, wantQueries)
	}
	wantDials := []string{"tcp " + server.addr.String(), "tcp " + server.addr.String(), "udp " + server.addr.String(), "udp " + server.addr.String()}
	if got := sorted(dial.Dials()); !slices.Equal(got, wantDials) {
		t.Errorf("dials = %q, want %q", got, wantDials)
	}
	if got := r.Stats(); got.QueriesSent != 4 || got.TCPQueries != 2 {
		t.Errorf("Stats() = %+v, want QueriesSent 4 and TCPQueries 2", got)
	}
}

func TestLookupEverySocketFromDial(t *testing.T) {
	z := newZone(t, testZoneRecords...)
	server := startServer(t, "127.0.0.1", z.handler())
	r, dial := newTestResolver(t, Config{}, server)

	for _, host := range []string{"www.example.test", "alias.example.test", "v4only.example.test", "nx.example.test"} {
		r.LookupNetIP(t.Context(), host)
	}

	queries := server.Queries()
	dials := dial.Dials()
	if len(queries) == 0 || len(dials) != len(queries) {
		t.Errorf("%d dials for %d queries received, want one dial per query", len(dials), len(queries))
	}
	for _, d := range dials {
		if want := "udp " + server.addr.String(); d != want {
			t.Errorf("dial %q, want %q", d, want)
		}
	}
	if got := r.Stats().QueriesSent; got != uint64(len(queries)) {
		t.Errorf("Stats().QueriesSent = %d, want %d", got, len(queries))
	}
}

func TestLookupDialRefused(t *testing.T) {
	server := startServer(t, "127.0.0.1", silent)
	dial := &countingDial{err: errDialRejected}
	r, _ := newTestResolver(t, Config{Dial: dial.Dial, Timeouts: []time.Duration{time.Second, time.Second}}, server)

	start := time.Now()
	_, err := r.LookupNetIP(t.Context(), "www.example.test")
	if elapsed := time.Since(start); elapsed > 500*time.Millisecond {
		t.Errorf("lookup took %v, want a prompt failure when every dial fails", elapsed)
	}

	want := fmt.Sprintf(`resolving "www.example.test" via access point "cell" with servers %[1]s: dns: no server answered: querying %[1]s: dialing udp: dial rejected by test`, server.addr)
	if err == nil || err.Error() != want {
		t.Errorf("error = %v, want %s", err, want)
	}
	if !errors.Is(err, errDialRejected) {
		t.Errorf("error %v does not wrap the dial error", err)
	}
	if got := server.Queries(); len(got) != 0 {
		t.Errorf("server got %v, want nothing sent around Dial", got)
	}
	// Two types, two rounds each.
	if got := len(dial.Dials()); got != 4 {
		t.Errorf("%d dials, want 4", got)
	}
}

func TestLookupServerZoneKept(t *testing.T) {
	// Dial refuses, so nothing leaves the host; only the address handed
	// to Dial is checked.
	dial := &countingDial{err: errDialRejected}
	server := netip.MustParseAddrPort("[fe80::1%lo]:53")
	r := New(Config{Name: "wifi", Servers: []netip.AddrPort{server}, Dial: dial.Dial, Timeouts: []time.Duration{time.Second}, Logger: testLogger(t)})

	if _, err := r.LookupNetIP(t.Context(), "www.example.test"); !errors.Is(err, errDialRejected) {
		t.Errorf("error = %v, want the dial error", err)
	}
	for _, d := range dial.Dials() {
		if want := "udp [fe80::1%lo]:53"; d != want {
			t.Errorf("dial %q, want %q", d, want)
		}
	}
	if got := r.Servers(); !slices.Equal(got, []netip.AddrPort{server}) {
		t.Errorf("Servers() = %v, want %v", got, server)
	}
}

func TestLookupCacheHit(t *testing.T) {
	z := newZone(t, testZoneRecords...)
	server := startServer(t, "127.0.0.1", z.handler())
	r, dial := newTestResolver(t, Config{}, server)

	for i := range 2 {
		addrs, err := r.LookupNetIP(t.Context(), "WWW.Example.Test")
		if err != nil {
			t.Fatalf("lookup %d: %v", i, err)
		}
		if want := addrsOf(t, wwwAddrs...); !slices.Equal(addrs, want) {
			t.Errorf("lookup %d: addresses = %v, want %v", i, addrs, want)
		}
	}

	if got := len(server.Queries()); got != 2 {
		t.Errorf("server got %d queries, want 2 (A and AAAA once)", got)
	}
	if got := len(dial.Dials()); got != 2 {
		t.Errorf("%d dials, want 2", got)
	}
	if got := r.Stats(); got.CacheHits != 2 || got.Lookups != 2 {
		t.Errorf("Stats() = %+v, want CacheHits 2 and Lookups 2", got)
	}
}

func TestLookupAfterFlush(t *testing.T) {
	z := newZone(t, testZoneRecords...)
	server := startServer(t, "127.0.0.1", z.handler())
	r, _ := newTestResolver(t, Config{}, server)

	for i := range 2 {
		if _, err := r.LookupNetIP(t.Context(), "www.example.test"); err != nil {
			t.Fatalf("lookup %d: %v", i, err)
		}
		r.Flush()
	}
	if got := len(server.Queries()); got != 4 {
		t.Errorf("server got %d queries, want 4 (A and AAAA after each flush)", got)
	}
	if got := r.cache.len(); got != 0 {
		t.Errorf("cache holds %d entries after Flush, want 0", got)
	}
}

func TestLookupCacheExpiry(t *testing.T) {
	z := newZone(t, testZoneRecords...)
	server := startServer(t, "127.0.0.1", z.handler())
	r, _ := newTestResolver(t, Config{}, server)
	clock := newFakeClock()
	r.now = clock.Now

	// A records live 60 s and the AAAA record 30 s.
	steps := []struct {
		advance time.Duration
		want    []string // queries this lookup sends
	}{
		{0, []string{"udp www.example.test. A", "udp www.example.test. AAAA"}},
		{29 * time.Second, nil},
		{time.Second, []string{"udp www.example.test. AAAA"}},
		{29 * time.Second, nil},
		{time.Second, []string{"udp www.example.test. A", "udp www.example.test. AAAA"}},
	}
	seen := 0
	for i, step := range steps {
		clock.Advance(step.advance)
		if _, err := r.LookupNetIP(t.Context(), "www.example.test"); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		queries := server.QueryStrings()
		if got := sorted(queries[seen:]); !slices.Equal(got, step.want) {
			t.Errorf("step %d (+%v): queries = %q, want %q", i, step.advance, got, step.want)
		}
		seen = len(queries)
	}
}

func TestLookupNegativeCache(t *testing.T) {
	tests := []struct {
		name      string
		soa       string // empty: no SOA in negative answers
		host      string
		cachedFor time.Duration
		wantErr   string // empty: the lookup succeeds
	}{
		{
			name:      "nxdomain uses soa minimum",
			soa:       testSOA,
			host:      "nx.example.test",
			cachedFor: 30 * time.Second,
			wantErr:   `resolving "nx.example.test" via access point "cell": dns: name not found`,
		},
		{
			name:      "nodata uses soa minimum",
			soa:       testSOA,
			host:      "v4only.example.test",
			cachedFor: 30 * time.Second,
		},
		{
			name:      "capped at five minutes",
			soa:       "example.test. 86400 IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 86400",
			host:      "nx.example.test",
			cachedFor: 5 * time.Minute,
			wantErr:   `resolving "nx.example.test" via access point "cell": dns: name not found`,
		},
		{
			name:      "soa ttl below its minimum",
			soa:       "example.test. 10 IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 300",
			host:      "nx.example.test",
			cachedFor: 10 * time.Second,
			wantErr:   `resolving "nx.example.test" via access point "cell": dns: name not found`,
		},
		{
			name:      "zero ttl kept one second",
			soa:       "example.test. 0 IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 0",
			host:      "nx.example.test",
			cachedFor: time.Second,
			wantErr:   `resolving "nx.example.test" via access point "cell": dns: name not found`,
		},
		{
			name:      "no soa kept one second",
			host:      "nx.example.test",
			cachedFor: time.Second,
			wantErr:   `resolving "nx.example.test" via access point "cell": dns: name not found`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			z := newZone(t, testZoneRecords...)
			z.soa = nil
			if tt.soa != "" {
				z.soa = mustRR(t, tt.soa)
			}
			server := startServer(t, "127.0.0.1", z.handler())
			r, _ := newTestResolver(t, Config{}, server)
			clock := newFakeClock()
			r.now = clock.Now

			lookup := func(step string) {
				t.Helper()
				_, err := r.LookupNetIP(t.Context(), tt.host)
				if tt.wantErr == "" {
					if err != nil {
						t.Fatalf("%s: LookupNetIP: %v", step, err)
					}
					return
				}
				if err == nil || err.Error() != tt.wantErr {
					t.Fatalf("%s: error = %v, want %s", step, err, tt.wantErr)
				}
				if !errors.Is(err, ErrNotFound) {
					t.Errorf("%s: error %v does not wrap ErrNotFound", step, err)
				}
			}

			lookup("first lookup")
			sent := len(server.Queries())
			if sent != 2 {
				t.Errorf("first lookup sent %d queries, want 2", sent)
			}

			clock.Advance(tt.cachedFor - time.Millisecond)
			lookup("before expiry")
			if got := len(server.Queries()); got != sent {
				t.Errorf("before expiry: %d new queries, want 0", got-sent)
			}

			// Only the AAAA answer of v4only is negative, so only it is
			// asked again.
			clock.Advance(time.Millisecond)
			lookup("after expiry")
			if got := server.count("udp", dnsmsg.TypeAAAA); got != 2 {
				t.Errorf("after expiry: %d AAAA queries in all, want 2", got)
			}
		})
	}
}

func TestLookupSearchOrder(t *testing.T) {
	z := newZone(t, testZoneRecords...)
	tests := []struct {
		name      string
		host      string
		wantNames []string // A questions, in order
		wantAddrs []string // nil: not found
	}{
		{
			name:      "single label tries search domains first",
			host:      "www",
			wantNames: []string{"www.corp.test.", "www.example.test."},
			wantAddrs: wwwAddrs,
		},
		{
			name:      "single label falls back to itself",
			host:      "nohost",
			wantNames: []string{"nohost.corp.test.", "nohost.example.test.", "nohost."},
		},
		{
			name:      "dotted name tried as is first",
			host:      "www.example.test",
			wantNames: []string{"www.example.test."},
			wantAddrs: wwwAddrs,
		},
		{
			name:      "dotted name then search domains",
			host:      "host.sub",
			wantNames: []string{"host.sub.", "host.sub.corp.test.", "host.sub.example.test."},
		},
		{
			name:      "trailing dot only as written",
			host:      "www.",
			wantNames: []string{"www."},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			server := startServer(t, "127.0.0.1", z.handler())
			r, _ := newTestResolver(t, Config{Search: []string{"corp.test", ".example.test."}}, server)

			addrs, err := r.LookupNetIP(t.Context(), tt.host)
			if tt.wantAddrs == nil {
				want := fmt.Sprintf(`resolving %q via access point "cell": dns: name not found`, tt.host)
				if err == nil || err.Error() != want {
					t.Errorf("error = %v, want %s", err, want)
				}
			} else {
				if err != nil {
					t.Fatalf("LookupNetIP: %v", err)
				}
				if want := addrsOf(t, tt.wantAddrs...); !slices.Equal(addrs, want) {
					t.Errorf("addresses = %v, want %v", addrs, want)
				}
			}

			var names []string
			for _, q := range server.Queries() {
				if q.qtype == dnsmsg.TypeA {
					names = append(names, q.name)
				}
			}
			if !slices.Equal(names, tt.wantNames) {
				t.Errorf("A questions = %q, want %q", names, tt.wantNames)
			}
		})
	}
}

func TestLookupIPLiteral(t *testing.T) {
	tests := []struct {
		name string
		host string
	}{
		{name: "ipv4", host: "192.0.2.7"},
		{name: "ipv6", host: "2001:db8::7"},
		{name: "ipv6 with zone", host: "fe80::1%eth0"},
		{name: "ipv4-mapped ipv6", host: "::ffff:192.0.2.7"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dial := &countingDial{err: errDialRejected}
			r := New(Config{Name: "cell", Servers: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:53")}, Dial: dial.Dial, Logger: testLogger(t)})

			addrs, err := r.LookupNetIP(t.Context(), tt.host)
			if err != nil {
				t.Fatalf("LookupNetIP: %v", err)
			}
			if want := []netip.Addr{netip.MustParseAddr(tt.host)}; !slices.Equal(addrs, want) {
				t.Errorf("addresses = %v, want %v", addrs, want)
			}
			if got := dial.Dials(); len(got) != 0 {
				t.Errorf("dials = %q, want none", got)
			}
			if got := r.Stats(); got != (Stats{}) {
				t.Errorf("Stats() = %+v, want all zero", got)
			}
		})
	}
}

func TestLookupInvalidName(t *testing.T) {
	tests := []struct {
		name string
		host string
	}{
		{name: "empty", host: ""},
		{name: "only a dot", host: "."},
		{name: "empty label", host: "www..example.test"},
		{name: "space", host: "www example.test"},
		{name: "escape", host: `www\046example.test`},
		{name: "label too long", host: strings.Repeat("a", 64) + ".test"},
		{name: "name too long", host: strings.Repeat("abcdefghi.", 26) + "test"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dial := &countingDial{err: errDialRejected}
			r := New(Config{Name: "cell", Servers: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:53")}, Dial: dial.Dial, Logger: testLogger(t)})

			_, err := r.LookupNetIP(t.Context(), tt.host)
			want := fmt.Sprintf(`resolving %q via access point "cell" with servers 127.0.0.1:53: dns: invalid name`, tt.host)
			if err == nil || err.Error() != want {
				t.Errorf("error = %v, want %s", err, want)
			}
			if got := dial.Dials(); len(got) != 0 {
				t.Errorf("dials = %q, want none", got)
			}
		})
	}
}

func TestLookupNoServers(t *testing.T) {
	r := New(Config{Name: "cell", Logger: testLogger(t)})
	_, err := r.LookupNetIP(t.Context(), "www.example.test")
	want := `resolving "www.example.test" via access point "cell": dns: no server answered: no servers configured`
	if err == nil || err.Error() != want {
		t.Errorf("error = %v, want %s", err, want)
	}
}

func TestLookupConcurrentShareQuery(t *testing.T) {
	z := newZone(t, testZoneRecords...)
	server := startServer(t, "127.0.0.1", z.delayed(100*time.Millisecond))
	r, _ := newTestResolver(t, Config{}, server)

	const callers = 8
	var (
		wg      sync.WaitGroup
		results [callers][]netip.Addr
		errs    [callers]error
	)
	for i := range callers {
		wg.Go(func() {
			results[i], errs[i] = r.LookupNetIP(t.Context(), "www.example.test")
		})
	}
	wg.Wait()

	for i := range callers {
		if errs[i] != nil {
			t.Errorf("caller %d: %v", i, errs[i])
		}
		if want := addrsOf(t, wwwAddrs...); !slices.Equal(results[i], want) {
			t.Errorf("caller %d: addresses = %v, want %v", i, results[i], want)
		}
	}
	if got, want := sorted(server.QueryStrings()), []string{"udp www.example.test. A", "udp www.example.test. AAAA"}; !slices.Equal(got, want) {
		t.Errorf("server queries = %q, want %q", got, want)
	}
	if got := r.Stats(); got.Shared+got.CacheHits != 2*(callers-1) {
		t.Errorf("Stats() = %+v, want Shared+CacheHits = %d", got, 2*(callers-1))
	}
}

func TestLookupCancelledCallerLeavesOthers(t *testing.T) {
	z := newZone(t, testZoneRecords...)
	server := startServer(t, "127.0.0.1", z.delayed(100*time.Millisecond))
	r, _ := newTestResolver(t, Config{}, server)

	cancelled := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
		defer cancel()
		_, err := r.LookupNetIP(ctx, "www.example.test")
		cancelled <- err
	}()
	addrs, err := r.LookupNetIP(t.Context(), "www.example.test")

	if err != nil {
		t.Fatalf("LookupNetIP: %v", err)
	}
	if want := addrsOf(t, wwwAddrs...); !slices.Equal(addrs, want) {
		t.Errorf("addresses = %v, want %v", addrs, want)
	}
	if err := <-cancelled; !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("cancelled caller: error = %v, want context.DeadlineExceeded", err)
	}
	if got := len(server.Queries()); got != 2 {
		t.Errorf("server got %d queries, want 2", got)
	}
}

func TestLookupCancelStopsQuery(t *testing.T) {
	server := startServer(t, "127.0.0.1", silent)
	r, _ := newTestResolver(t, Config{Timeouts: []time.Duration{5 * time.Second, 5 * time.Second}}, server)

	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := r.LookupNetIP(ctx, "www.example.test")
	if elapsed := time.Since(start); elapsed > time.Second {
		t.Errorf("lookup took %v, want it to end with its context", elapsed)
	}
	want := fmt.Sprintf(`resolving "www.example.test" via access point "cell" with servers %s: context deadline exceeded`, server.addr)
	if err == nil || err.Error() != want {
		t.Errorf("error = %v, want %s", err, want)
	}

	// The abandoned query is removed, so the next lookup asks again.
	r.mu.Lock()
	inflight := len(r.inflight)
	r.mu.Unlock()
	if inflight != 0 {
		t.Errorf("%d queries still in flight, want 0", inflight)
	}
}

func TestLookupCNAMEChain(t *testing.T) {
	z := newZone(t, testZoneRecords...)
	server := startServer(t, "127.0.0.1", z.handler())
	r, _ := newTestResolver(t, Config{}, server)
	clock := newFakeClock()
	r.now = clock.Now

	addrs, err := r.LookupNetIP(t.Context(), "alias.example.test")
	if err != nil {
		t.Fatalf("LookupNetIP: %v", err)
	}
	if want := addrsOf(t, wwwAddrs...); !slices.Equal(addrs, want) {
		t.Errorf("addresses = %v, want %v", addrs, want)
	}

	// The A answer lives as long as its shortest record, the 20 s CNAME.
	clock.Advance(19 * time.Second)
	r.LookupNetIP(t.Context(), "alias.example.test")
	if got := server.count("udp", dnsmsg.TypeA); got != 1 {
		t.Errorf("after 19s: %d A queries, want 1", got)
	}
	clock.Advance(time.Second)
	r.LookupNetIP(t.Context(), "alias.example.test")
	if got := server.count("udp", dnsmsg.TypeA); got != 2 {
		t.Errorf("after 20s: %d A queries, want 2", got)
	}
}

func TestLookupPartialAnswer(t *testing.T) {
	z := newZone(t, testZoneRecords...)
	server := startServer(t, "127.0.0.1", func(w dnsmsg.ResponseWriter, req *dnsmsg.Msg) {
		if req.Question[0].Qtype == dnsmsg.TypeAAAA {
			w.WriteMsg(new(dnsmsg.Msg).SetRcode(req, dnsmsg.RcodeServerFailure))
			return
		}
		w.WriteMsg(z.reply(req))
	})
	r, _ := newTestResolver(t, Config{Timeouts: []time.Duration{time.Second}}, server)

	addrs, err := r.LookupNetIP(t.Context(), "www.example.test")
	if err != nil {
		t.Fatalf("LookupNetIP: %v", err)
	}
	if want := addrsOf(t, "192.0.2.1", "192.0.2.2"); !slices.Equal(addrs, want) {
		t.Errorf("addresses = %v, want %v", addrs, want)
	}
}

func TestLookupIgnoresMismatchedAnswers(t *testing.T) {
	z := newZone(t, testZoneRecords...)
	forged := mustRR(t, "www.example.test. 60 IN A 203.0.113.66")
	server := startServer(t, "127.0.0.1", func(w dnsmsg.ResponseWriter, req *dnsmsg.Msg) {
		// A forged answer with the wrong ID, then one for another
		// question, then the real answer.
		wrongID := new(dnsmsg.Msg).SetReply(req)
		wrongID.Id = req.Id + 1
		wrongID.Answer = []dnsmsg.RR{forged}
		w.WriteMsg(wrongID)

		wrongQuestion := new(dnsmsg.Msg).SetReply(req)
		wrongQuestion.Question[0].Name = "evil.example.test."
		wrongQuestion.Answer = []dnsmsg.RR{forged}
		w.WriteMsg(wrongQuestion)

		w.WriteMsg(z.reply(req))
	})
	r, _ := newTestResolver(t, Config{Timeouts: []time.Duration{time.Second}}, server)

	addrs, err := r.LookupNetIP(t.Context(), "www.example.test")
	if err != nil {
		t.Fatalf("LookupNetIP: %v", err)
	}
	if want := addrsOf(t, wwwAddrs...); !slices.Equal(addrs, want) {
		t.Errorf("addresses = %v, want %v", addrs, want)
	}
}

func TestSystemIPLiteral(t *testing.T) {
	r := System()
	addrs, err := r.LookupNetIP(t.Context(), "192.0.2.7")
	if err != nil {
		t.Fatalf("LookupNetIP: %v", err)
	}
	if want := addrsOf(t, "192.0.2.7"); !slices.Equal(addrs, want) {
		t.Errorf("addresses = %v, want %v", addrs, want)
	}
	if got := r.Servers(); got != nil {
		t.Errorf("Servers() = %v, want nil", got)
	}
}

func TestErrorText(t *testing.T) {
	servers := []netip.AddrPort{netip.MustParseAddrPort("192.0.2.53:53"), netip.MustParseAddrPort("[2001:db8::53]:53")}
	tests := []struct {
		name string
		err  *Error
		want string
	}{
		{
			name: "not found",
			err:  &Error{Name: "www.example.test", AccessPoint: "cell", Servers: servers, Err: ErrNotFound},
			want: `resolving "www.example.test" via access point "cell": dns: name not found`,
		},
		{
			name: "no answer",
			err:  &Error{Name: "www.example.test", AccessPoint: "cell", Servers: servers, Err: ErrNoAnswer},
			want: `resolving "www.example.test" via access point "cell" with servers 192.0.2.53:53, [2001:db8::53]:53: dns: no server answered`,
		},
		{
			name: "no servers",
			err:  &Error{Name: "www.example.test", AccessPoint: "system", Err: context.Canceled},
			want: `resolving "www.example.test" via access point "system": context canceled`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.err.Error(); got != tt.want {
				t.Errorf("Error() = %s, want %s", got, tt.want)
			}
			if !errors.Is(tt.err, tt.err.Err) {
				t.Errorf("errors.Is(err, %v) = false", tt.err.Err)
			}
		})
	}
}
