package dns

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	dnsmsg "github.com/miekg/dns"
)

// testQuery is one query as a test server received it.
type testQuery struct {
	network string // "udp" or "tcp"
	name    string
	qtype   uint16
}

func (q testQuery) String() string {
	return q.network + " " + q.name + " " + dnsmsg.TypeToString[q.qtype]
}

// testServer is a DNS server on loopback, UDP and TCP on one port, that
// records every query it receives.
type testServer struct {
	addr netip.AddrPort

	mu      sync.Mutex // protects queries
	queries []testQuery
}

// startServer starts a server on host ("127.0.0.1" or "::1") port 0 whose
// handler is handle, and stops it when the test ends.
func startServer(t *testing.T, host string, handle dnsmsg.HandlerFunc) *testServer {
	t.Helper()
	s := &testServer{}

	pc, ln := listenSamePort(t, host)
	s.addr = pc.LocalAddr().(*net.UDPAddr).AddrPort()

	handler := dnsmsg.HandlerFunc(func(w dnsmsg.ResponseWriter, req *dnsmsg.Msg) {
		if len(req.Question) == 1 {
			s.mu.Lock()
			s.queries = append(s.queries, testQuery{
				network: w.LocalAddr().Network(),
				name:    req.Question[0].Name,
				qtype:   req.Question[0].Qtype,
			})
			s.mu.Unlock()
		}
		handle(w, req)
	})

	for _, srv := range []*dnsmsg.Server{
		{PacketConn: pc, Handler: handler},
		{Listener: ln, Handler: handler},
	} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go srv.ActivateAndServe()
		<-started
		t.Cleanup(func() { srv.Shutdown() })
	}
	return s
}

// listenSamePort opens a UDP socket on a free port and a TCP listener on
// the same port, retrying when another process holds the TCP port.
func listenSamePort(t *testing.T, host string) (net.PacketConn, net.Listener) {
	t.Helper()
	for range 20 {
		pc, err := net.ListenPacket("udp", net.JoinHostPort(host, "0"))
		if err != nil {
			t.Fatalf("listening on udp: %v", err)
		}
		ln, err := net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			return pc, ln
		}
		pc.Close()
	}
	t.Fatalf("no port free for both udp and tcp on %s", host)
	return nil, nil
}

// Queries returns a copy of the queries received so far.
func (s *testServer) Queries() []testQuery {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]testQuery(nil), s.queries...)
}

// QueryStrings returns the queries received so far as "udp name TYPE".
func (s *testServer) QueryStrings() []string {
	var out []string
	for _, q := range s.Queries() {
		out = append(out, q.String())
	}
	return out
}

// count returns how many queries of qtype arrived over network.
func (s *testServer) count(network string, qtype uint16) int {
	n := 0
	for _, q := range s.Queries() {
		if q.network == network && q.qtype == qtype {
			n++
		}
	}
	return n
}

// testZone maps lowercase owner names to their records and answers
// queries from them, following CNAMEs as a recursive server would.
type testZone struct {
	records map[string][]dnsmsg.RR
	soa     dnsmsg.RR // added to negative answers; nil: none
}

const testSOA = "example.test. 3600 IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 30"

func newZone(t *testing.T, records ...string) *testZone {
	t.Helper()
	z := &testZone{records: make(map[string][]dnsmsg.RR), soa: mustRR(t, testSOA)}
	for _, text := range records {
		rr := mustRR(t, text)
		name := strings.ToLower(rr.Header().Name)
		z.records[name] = append(z.records[name], rr)
	}
	return z
}

func mustRR(t *testing.T, text string) dnsmsg.RR {
	t.Helper()
	rr, err := dnsmsg.NewRR(text)
	if err != nil {
		t.Fatalf("parsing record %q: %v", text, err)
	}
	return rr
}

// reply builds the answer to req.
func (z *testZone) reply(req *dnsmsg.Msg) *dnsmsg.Msg {
	resp := new(dnsmsg.Msg).SetReply(req)
	q := req.Question[0]
	name := strings.ToLower(q.Name)
	for range 8 {
		rrs, ok := z.records[name]
		if !ok {
			resp.Rcode = dnsmsg.RcodeNameError
			break
		}
		found, cname := false, ""
		for _, rr := range rrs {
			switch {
			case rr.Header().Rrtype == q.Qtype:
				resp.Answer = append(resp.Answer, rr)
				found = true
			case rr.Header().Rrtype == dnsmsg.TypeCNAME:
				resp.Answer = append(resp.Answer, rr)
				cname = strings.ToLower(rr.(*dnsmsg.CNAME).Target)
			}
		}
		if found || cname == "" {
			break
		}
		name = cname
	}
	if !hasType(resp.Answer, q.Qtype) && z.soa != nil {
		resp.Ns = append(resp.Ns, z.soa)
	}
	return resp
}

func hasType(rrs []dnsmsg.RR, qtype uint16) bool {
	for _, rr := range rrs {
		if rr.Header().Rrtype == qtype {
			return true
		}
	}
	return false
}

// handler answers from z.
func (z *testZone) handler() dnsmsg.HandlerFunc {
	return func(w dnsmsg.ResponseWriter, req *dnsmsg.Msg) {
		w.WriteMsg(z.reply(req))
	}
}

// delayed answers from z after delay.
func (z *testZone) delayed(delay time.Duration) dnsmsg.HandlerFunc {
	return func(w dnsmsg.ResponseWriter, req *dnsmsg.Msg) {
		time.Sleep(delay)
		w.WriteMsg(z.reply(req))
	}
}

// silent never answers.
func silent(dnsmsg.ResponseWriter, *dnsmsg.Msg) {}

// rcodeHandler answers every query with rcode and nothing else.
func rcodeHandler(rcode int) dnsmsg.HandlerFunc {
	return func(w dnsmsg.ResponseWriter, req *dnsmsg.Msg) {
		w.WriteMsg(new(dnsmsg.Msg).SetRcode(req, rcode))
	}
}

// testZoneRecords are the records most tests resolve.
var testZoneRecords = []string{
	"www.example.test. 60 IN A 192.0.2.1",
	"www.example.test. 60 IN A 192.0.2.2",
	"www.example.test. 30 IN AAAA 2001:db8::1",
	"v4only.example.test. 60 IN A 192.0.2.10",
	"alias.example.test. 300 IN CNAME mid.example.test.",
	"mid.example.test. 20 IN CNAME www.example.test.",
}

// testLogger returns a logger that writes through t.Log until the test
// ends; records from goroutines that outlive the test are dropped instead
// of failing it.
func testLogger(t *testing.T) *slog.Logger {
	w := &testLogWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testLogWriter struct {
	t *testing.T

	mu   sync.Mutex // protects done
	done bool
}

func (w *testLogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimSuffix(string(p), "\n"))
	}
	return len(p), nil
}

// countingDial wraps a net.Dialer and records every socket it opens.
type countingDial struct {
	mu    sync.Mutex // protects dials
	dials []string   // "network address"
	err   error      // when set, every dial fails with it
}

func (d *countingDial) Dial(ctx context.Context, network, address string) (net.Conn, error) {
	d.mu.Lock()
	d.dials = append(d.dials, network+" "+address)
	err := d.err
	d.mu.Unlock()
	if err != nil {
		return nil, err
	}
	return (&net.Dialer{}).DialContext(ctx, network, address)
}

func (d *countingDial) Dials() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.dials...)
}

// fakeClock is a clock that tests move by hand.
type fakeClock struct {
	mu  sync.Mutex // protects now
	now time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

var errDialRejected = errors.New("dial rejected by test")
