package dns

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	dnsmsg "github.com/miekg/dns"
)

func TestParseAnswer(t *testing.T) {
	tests := []struct {
		name         string
		qname        string
		qtype        uint16
		rcode        int
		answer       []string
		authority    []string
		wantAddrs    []string
		wantTTL      time.Duration
		wantNXDomain bool
	}{
		{
			name:      "minimum ttl of the rrset",
			qname:     "www.example.test.",
			qtype:     dnsmsg.TypeA,
			answer:    []string{"www.example.test. 60 IN A 192.0.2.1", "www.example.test. 40 IN A 192.0.2.2"},
			wantAddrs: []string{"192.0.2.1", "192.0.2.2"},
			wantTTL:   40 * time.Second,
		},
		{
			name:  "cname chain counts its ttls",
			qname: "alias.example.test.",
			qtype: dnsmsg.TypeAAAA,
			answer: []string{
				"alias.example.test. 300 IN CNAME mid.example.test.",
				"mid.example.test. 15 IN CNAME www.example.test.",
				"www.example.test. 60 IN AAAA 2001:db8::1",
			},
			wantAddrs: []string{"2001:db8::1"},
			wantTTL:   15 * time.Second,
		},
		{
			name:      "owner name compared without case",
			qname:     "WWW.example.test.",
			qtype:     dnsmsg.TypeA,
			answer:    []string{"www.EXAMPLE.test. 60 IN A 192.0.2.1"},
			wantAddrs: []string{"192.0.2.1"},
			wantTTL:   60 * time.Second,
		},
		{
			name:      "records of other names and types ignored",
			qname:     "www.example.test.",
			qtype:     dnsmsg.TypeA,
			answer:    []string{"other.example.test. 60 IN A 203.0.113.1", "www.example.test. 60 IN AAAA 2001:db8::1", "www.example.test. 60 IN A 192.0.2.1"},
			wantAddrs: []string{"192.0.2.1"},
			wantTTL:   60 * time.Second,
		},
		{
			name:      "ttl capped at one hour",
			qname:     "www.example.test.",
			qtype:     dnsmsg.TypeA,
			answer:    []string{"www.example.test. 86400 IN A 192.0.2.1"},
			wantAddrs: []string{"192.0.2.1"},
			wantTTL:   time.Hour,
		},
		{
			name:      "zero ttl not cached",
			qname:     "www.example.test.",
			qtype:     dnsmsg.TypeA,
			answer:    []string{"www.example.test. 0 IN A 192.0.2.1"},
			wantAddrs: []string{"192.0.2.1"},
			wantTTL:   0,
		},
		{
			name:  "cname loop ends as nodata",
			qname: "a.example.test.",
			qtype: dnsmsg.TypeA,
			answer: []string{
				"a.example.test. 60 IN CNAME b.example.test.",
				"b.example.test. 60 IN CNAME a.example.test.",
			},
			wantTTL: time.Second,
		},
		{
			name:         "nxdomain after cname uses soa",
			qname:        "alias.example.test.",
			qtype:        dnsmsg.TypeA,
			rcode:        dnsmsg.RcodeNameError,
			answer:       []string{"alias.example.test. 300 IN CNAME gone.example.test."},
			authority:    []string{testSOA},
			wantTTL:      30 * time.Second,
			wantNXDomain: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := new(dnsmsg.Msg).SetQuestion(tt.qname, tt.qtype)
			resp.Response = true
			resp.Rcode = tt.rcode
			for _, text := range tt.answer {
				resp.Answer = append(resp.Answer, mustRR(t, text))
			}
			for _, text := range tt.authority {
				resp.Ns = append(resp.Ns, mustRR(t, text))
			}

			got := parseAnswer(resp, tt.qname, tt.qtype)
			if want := addrsOf(t, tt.wantAddrs...); !slices.Equal(got.addrs, want) {
				t.Errorf("addresses = %v, want %v", got.addrs, want)
			}
			if got.ttl != tt.wantTTL {
				t.Errorf("ttl = %v, want %v", got.ttl, tt.wantTTL)
			}
			if got.nxdomain != tt.wantNXDomain {
				t.Errorf("nxdomain = %v, want %v", got.nxdomain, tt.wantNXDomain)
			}
		})
	}
}

func TestCacheEvictsLeastRecentlyUsed(t *testing.T) {
	c := newCache(2)
	now := time.Now()
	later := now.Add(time.Minute)
	keys := []cacheKey{{"a.test.", dnsmsg.TypeA}, {"b.test.", dnsmsg.TypeA}, {"c.test.", dnsmsg.TypeA}}
	ans := answer{addrs: []netip.Addr{netip.MustParseAddr("192.0.2.1")}}

	c.put(keys[0], ans, later)
	c.put(keys[1], ans, later)
	if _, ok := c.get(keys[0], now); !ok {
		t.Fatalf("a.test missing before eviction")
	}
	c.put(keys[2], ans, later)

	for _, tt := range []struct {
		key  cacheKey
		want bool
	}{
		{keys[0], true},
		{keys[1], false},
		{keys[2], true},
	} {
		if _, ok := c.get(tt.key, now); ok != tt.want {
			t.Errorf("get(%s) found = %v, want %v", tt.key.name, ok, tt.want)
		}
	}
	if got := c.len(); got != 2 {
		t.Errorf("len = %d, want 2", got)
	}
}

func TestCacheDropsExpired(t *testing.T) {
	c := newCache(4)
	now := time.Now()
	key := cacheKey{"a.test.", dnsmsg.TypeA}
	c.put(key, answer{}, now.Add(time.Second))

	if _, ok := c.get(key, now.Add(time.Second-time.Nanosecond)); !ok {
		t.Errorf("entry missing before expiry")
	}
	if _, ok := c.get(key, now.Add(time.Second)); ok {
		t.Errorf("entry found at expiry")
	}
	if got := c.len(); got != 0 {
		t.Errorf("len = %d after expiry, want 0", got)
	}
}
