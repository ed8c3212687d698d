package dns

import (
	"container/list"
	"context"
	"net/netip"
	"strings"
	"sync"
	"time"

	dnsmsg "github.com/miekg/dns"
)

// Limits on how long answers stay cached.
const (
	maxPositiveTTL = time.Hour
	maxNegativeTTL = 5 * time.Minute
	minNegativeTTL = time.Second

	// maxCNAMEHops bounds the CNAME chain followed inside one answer, so
	// a looping chain ends.
	maxCNAMEHops = 16
)

// cacheKey identifies one question. The name is lowercase and fully
// qualified, because DNS names compare without case.
type cacheKey struct {
	name  string
	qtype uint16
}

// answer is the outcome of one (name, type) question.
type answer struct {
	addrs    []netip.Addr  // empty for NXDOMAIN and NODATA; shared, never modified
	nxdomain bool          // the name does not exist, for any type
	ttl      time.Duration // how long the answer may be cached; 0: not at all
}

// err returns ErrNotFound for a negative answer.
func (a answer) err() error {
	if len(a.addrs) == 0 {
		return ErrNotFound
	}
	return nil
}

// lookupType returns the answer for one (name, type), from the cache, from
// an identical lookup already in flight, or from the servers.
func (r *Resolver) lookupType(ctx context.Context, name string, qtype uint16) (answer, error) {
	key := cacheKey{name: strings.ToLower(name), qtype: qtype}
	if r.cache != nil {
		if ans, ok := r.cache.get(key, r.now()); ok {
			r.stats.cacheHits.Add(1)
			return ans, ans.err()
		}
	}

	// The query runs on its own goroutine with a context detached from
	// the caller's, so one caller giving up does not fail the others.
	// The last caller to leave cancels it.
	r.mu.Lock()
	c, shared := r.inflight[key]
	if !shared {
		queryCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		c = &call{done: make(chan struct{}), cancel: cancel}
		r.inflight[key] = c
		go r.runCall(queryCtx, key, name, qtype, c)
	}
	c.waiters++
	r.mu.Unlock()
	if shared {
		r.stats.shared.Add(1)
	}

	select {
	case <-c.done:
		if c.err != nil {
			return answer{}, c.err
		}
		return c.ans, c.ans.err()
	case <-ctx.Done():
		r.leaveCall(key, c)
		return answer{}, ctx.Err()
	}
}

// call is a query in flight that identical lookups wait for.
type call struct {
	done   chan struct{} // closed when ans and err are set
	ans    answer
	err    error
	cancel context.CancelFunc

	waiters int // callers still waiting; guarded by Resolver.mu
}

func (r *Resolver) runCall(ctx context.Context, key cacheKey, name string, qtype uint16, c *call) {
	defer c.cancel()

	resp, err := r.exchange(ctx, name, qtype)
	var ans answer
	if err == nil {
		ans = parseAnswer(resp, name, qtype)
		if r.cache != nil && ans.ttl > 0 {
			r.cache.put(key, ans, r.now().Add(ans.ttl))
		}
	}

	// The cache is filled before the call is removed, so a lookup that
	// starts in between finds the cached answer rather than asking again.
	r.mu.Lock()
	if r.inflight[key] == c {
		delete(r.inflight, key)
	}
	r.mu.Unlock()

	c.ans, c.err = ans, err
	close(c.done)
}

// leaveCall drops one waiter of c and cancels the query when none is left.
func (r *Resolver) leaveCall(key cacheKey, c *call) {
	r.mu.Lock()
	defer r.mu.Unlock()

	c.waiters--
	if c.waiters > 0 {
		return
	}
	// A lookup that starts after this point must send its own query
	// rather than join one that is being cancelled.
	if r.inflight[key] == c {
		delete(r.inflight, key)
	}
	c.cancel()
}

// parseAnswer extracts the addresses of type qtype for qname from resp,
// following a CNAME chain within the answer section. A positive result may
// be cached for the minimum TTL of the records used, capped at an hour. A
// negative one may be cached for the SOA's negative TTL (RFC 2308 section
// 5), kept between one second and five minutes.
func parseAnswer(resp *dnsmsg.Msg, qname string, qtype uint16) answer {
	var (
		addrs  []netip.Addr
		minTTL = uint32(maxPositiveTTL / time.Second)
		target = qname
	)
	for range maxCNAMEHops {
		var (
			cname    string
			cnameTTL uint32
		)
		for _, rr := range resp.Answer {
			h := rr.Header()
			if !strings.EqualFold(h.Name, target) {
				continue
			}
			switch rec := rr.(type) {
			case *dnsmsg.A:
				if addr, ok := netip.AddrFromSlice(rec.A.To4()); ok && qtype == dnsmsg.TypeA {
					addrs = append(addrs, addr)
					minTTL = min(minTTL, h.Ttl)
				}
			case *dnsmsg.AAAA:
				if addr, ok := netip.AddrFromSlice(rec.AAAA.To16()); ok && qtype == dnsmsg.TypeAAAA {
					addrs = append(addrs, addr)
					minTTL = min(minTTL, h.Ttl)
				}
			case *dnsmsg.CNAME:
				cname, cnameTTL = rec.Target, h.Ttl
			}
		}
		if len(addrs) > 0 || cname == "" {
			break
		}
		minTTL = min(minTTL, cnameTTL)
		target = cname
	}

	if resp.Rcode == dnsmsg.RcodeSuccess && len(addrs) > 0 {
		return answer{addrs: addrs, ttl: time.Duration(minTTL) * time.Second}
	}
	return answer{nxdomain: resp.Rcode == dnsmsg.RcodeNameError, ttl: negativeTTL(resp)}
}

// negativeTTL returns how long a negative answer may be cached. Without an
// SOA record there is nothing to go by, so the answer is kept for the
// minimum only.
func negativeTTL(resp *dnsmsg.Msg) time.Duration {
	ttl := minNegativeTTL
	for _, rr := range resp.Ns {
		if soa, ok := rr.(*dnsmsg.SOA); ok {
			ttl = time.Duration(min(soa.Hdr.Ttl, soa.Minttl)) * time.Second
			break
		}
	}
	return min(max(ttl, minNegativeTTL), maxNegativeTTL)
}

// cache is a size-bounded store of answers that evicts the least recently
// used entry. It is safe for concurrent use.
type cache struct {
	max int

	mu      sync.Mutex                 // protects entries and order
	entries map[cacheKey]*list.Element // values are *cacheEntry
	order   *list.List                 // most recently used first
}

type cacheEntry struct {
	key     cacheKey
	ans     answer
	expires time.Time
}

func newCache(size int) *cache {
	return &cache{max: size, entries: make(map[cacheKey]*list.Element), order: list.New()}
}

// get returns the answer for key unless it is missing or expired at now.
func (c *cache) get(key cacheKey, now time.Time) (answer, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()

	elem, ok := c.entries[key]
	if !ok {
		return answer{}, false
	}
	entry := elem.Value.(*cacheEntry)
	if !now.Before(entry.expires) {
		c.order.Remove(elem)
		delete(c.entries, key)
		return answer{}, false
	}
	c.order.MoveToFront(elem)
	return entry.ans, true
}

// put stores ans for key until expires, evicting the least recently used
// entry when the cache is full.
func (c *cache) put(key cacheKey, ans answer, expires time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()

	if elem, ok := c.entries[key]; ok {
		entry := elem.Value.(*cacheEntry)
		entry.ans, entry.expires = ans, expires
		c.order.MoveToFront(elem)
		return
	}
	c.entries[key] = c.order.PushFront(&cacheEntry{key: key, ans: ans, expires: expires})
	if c.order.Len() > c.max {
		oldest := c.order.Back()
		c.order.Remove(oldest)
		delete(c.entries, oldest.Value.(*cacheEntry).key)
	}
}

// len returns the number of entries, expired ones included.
func (c *cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.order.Len()
}

// clear removes every entry.
func (c *cache) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	clear(c.entries)
	c.order.Init()
}
