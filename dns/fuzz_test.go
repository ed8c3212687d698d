package dns

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	dnsmsg "github.com/miekg/dns"
)

// answerConn is a connection to a DNS server that answers every query with
// the same bytes, their ID set to the query's so that they are taken for
// the answer. Over UDP it sends them as one datagram, over TCP with the
// two-byte length prefix. A second read ends the exchange with EOF.
type answerConn struct {
	network string
	answer  []byte

	mu      sync.Mutex
	pending []byte // what the next Read returns; nil before the query
	read    bool   // the answer has been read
}

func (c *answerConn) Write(p []byte) (int, error) {
	query := p
	if c.network == "tcp" {
		if len(p) < 2 {
			return 0, errors.New("answerConn: short TCP write")
		}
		query = p[2:]
	}
	if len(query) < 2 {
		return 0, errors.New("answerConn: short query")
	}
	answer := bytes.Clone(c.answer)
	if len(answer) >= 2 {
		copy(answer, query[:2])
	}
	if c.network == "tcp" {
		answer = append(binary.BigEndian.AppendUint16(nil, uint16(len(answer))), answer...)
	}
	c.mu.Lock()
	c.pending = answer
	c.mu.Unlock()
	return len(p), nil
}

func (c *answerConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pending == nil || c.read && c.network == "udp" {
		return 0, io.EOF
	}
	if len(c.pending) == 0 {
		return 0, io.EOF
	}
	n := copy(p, c.pending)
	if c.network == "udp" {
		c.read = true
		return n, nil
	}
	c.pending = c.pending[n:]
	return n, nil
}

func (c *answerConn) Close() error                     { return nil }
func (c *answerConn) LocalAddr() net.Addr              { return &net.UDPAddr{} }
func (c *answerConn) RemoteAddr() net.Addr             { return &net.UDPAddr{} }
func (c *answerConn) SetDeadline(time.Time) error      { return nil }
func (c *answerConn) SetReadDeadline(time.Time) error  { return nil }
func (c *answerConn) SetWriteDeadline(time.Time) error { return nil }

// packed packs a message for the seed corpus.
func packed(f *testing.F, m *dnsmsg.Msg) []byte {
	f.Helper()
	b, err := m.Pack()
	if err != nil {
		f.Fatalf("packing seed: %v", err)
	}
	return b
}

// FuzzLookupAnswer feeds arbitrary bytes to a resolver as its server's
// answer, over UDP and, when they claim to be truncated, over TCP. The
// resolver must not panic, and must return either addresses of the asked
// name's families or an *Error.
func FuzzLookupAnswer(f *testing.F) {
	reply := func(rrs ...string) *dnsmsg.Msg {
		m := new(dnsmsg.Msg).SetQuestion("www.example.test.", dnsmsg.TypeA)
		m.Response, m.Authoritative = true, true
		for _, text := range rrs {
			rr, err := dnsmsg.NewRR(text)
			if err != nil {
				f.Fatalf("seed record %q: %v", text, err)
			}
			m.Answer = append(m.Answer, rr)
		}
		return m
	}
	f.Add(packed(f, reply("www.example.test. 60 IN A 192.0.2.1", "www.example.test. 60 IN A 192.0.2.2")))
	f.Add(packed(f, reply("www.example.test. 60 IN CNAME a.example.test.", "a.example.test. 60 IN CNAME www.example.test.")))
	f.Add(packed(f, reply("www.example.test. 60 IN CNAME b.example.test.", "b.example.test. 5 IN AAAA 2001:db8::1")))
	nx := reply()
	nx.Rcode = dnsmsg.RcodeNameError
	soa, _ := dnsmsg.NewRR("example.test. 60 IN SOA ns.example.test. host.example.test. 1 3600 600 86400 30")
	nx.Ns = append(nx.Ns, soa)
	f.Add(packed(f, nx))
	tc := reply()
	tc.Truncated = true
	f.Add(packed(f, tc))
	f.Add([]byte{0, 0, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0})

	f.Fuzz(func(t *testing.T, answer []byte) {
		r := New(Config{
			Name:     "fuzz",
			Servers:  []netip.AddrPort{netip.MustParseAddrPort("192.0.2.53:53")},
			Timeouts: []time.Duration{100 * time.Millisecond},
			Dial: func(_ context.Context, network, _ string) (net.Conn, error) {
				return &answerConn{network: network, answer: answer}, nil
			},
			CacheSize: -1,
		})
		addrs, err := r.LookupNetIP(t.Context(), "www.example.test")
		if err != nil {
			var lookupErr *Error
			if !errors.As(err, &lookupErr) {
				t.Fatalf("error %T %v, want *Error", err, err)
			}
			if len(addrs) != 0 {
				t.Fatalf("addresses %v together with an error", addrs)
			}
			return
		}
		if len(addrs) == 0 {
			t.Fatal("no addresses and no error")
		}
		for _, a := range addrs {
			if !a.IsValid() || a.Zone() != "" {
				t.Fatalf("invalid address %v in %v", a, addrs)
			}
		}
	})
}

// FuzzParseAnswer checks that any message that unpacks gives an answer
// whose addresses have the asked type and whose TTL stays in its bounds.
func FuzzParseAnswer(f *testing.F) {
	m := new(dnsmsg.Msg).SetQuestion("www.example.test.", dnsmsg.TypeAAAA)
	rr, _ := dnsmsg.NewRR("www.example.test. 4000 IN AAAA 2001:db8::1")
	m.Answer = append(m.Answer, rr)
	f.Add(packed(f, m), uint16(dnsmsg.TypeAAAA))

	f.Fuzz(func(t *testing.T, data []byte, qtype uint16) {
		resp := new(dnsmsg.Msg)
		if resp.Unpack(data) != nil {
			return
		}
		if qtype != dnsmsg.TypeA {
			qtype = dnsmsg.TypeAAAA
		}
		ans := parseAnswer(resp, "www.example.test.", qtype)
		for _, a := range ans.addrs {
			if a.Is4() != (qtype == dnsmsg.TypeA) {
				t.Fatalf("address %v in the answer to type %d", a, qtype)
			}
		}
		if len(ans.addrs) > 0 && ans.ttl > maxPositiveTTL {
			t.Fatalf("positive TTL %v above %v", ans.ttl, maxPositiveTTL)
		}
		if len(ans.addrs) == 0 && (ans.ttl < minNegativeTTL || ans.ttl > maxNegativeTTL) {
			t.Fatalf("negative TTL %v outside %v to %v", ans.ttl, minNegativeTTL, maxNegativeTTL)
		}
	})
}
