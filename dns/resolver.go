// Package dns resolves names for one access point: it queries that access
// point's own servers, over sockets from the access point's bound dialer,
// with Windows-style server timing and a cache. It never reads
// /etc/resolv.conf, which holds whatever the last DHCP client wrote, except
// through System, the resolver for "dns: system".
package dns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"iapd/internal/logkey"

	dnsmsg "github.com/miekg/dns"
)

// Defaults for Config fields left zero.
var (
	defaultTimeouts = []time.Duration{1 * time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second}
)

const defaultCacheSize = 4096

// Config describes the resolver of one access point.
type Config struct {
	// Name is the access point's name, used in logs and errors.
	Name string

	// Servers are asked in this order: the first alone at first, then all
	// of them. An IPv6 zone (fe80::1%wlan0) is kept and passed to Dial.
	// SetServers replaces them, as a Watcher does for "dns: auto".
	Servers []netip.AddrPort

	// Search lists search domains without a trailing dot. A name without
	// a dot is tried with each of them before it is tried alone; a name
	// with a dot is tried alone first.
	Search []string

	// Timeouts are the waits of the successive rounds: the first server
	// alone for Timeouts[0], then all servers again for each further
	// wait. Each should be positive. Nil means 1s, 2s, 4s, 8s.
	Timeouts []time.Duration

	// Dial opens every socket the resolver uses, UDP and TCP, so queries
	// leave through the access point's interface. Nil means a plain
	// net.Dialer, which follows the main routing table.
	Dial func(ctx context.Context, network, address string) (net.Conn, error)

	// Logger receives Debug records per query. Nil discards them.
	Logger *slog.Logger

	// CacheSize is the maximum number of cached (name, type) answers.
	// Zero means 4096; a negative value disables the cache.
	CacheSize int
}

// Resolver resolves names through the servers of one access point. Create
// it with New or System; the zero value is not usable. It is safe for
// concurrent use, and the slices it returns belong to the caller.
type Resolver struct {
	name     string
	set      atomic.Pointer[serverSet] // never nil after New
	timeouts []time.Duration
	dial     func(ctx context.Context, network, address string) (net.Conn, error)
	log      *slog.Logger

	// system, when set, replaces all of the above with the host's resolver.
	system *net.Resolver

	// now is the clock of the cache, replaced by tests to expire entries.
	now func() time.Time

	cache *cache // nil when disabled

	mu       sync.Mutex         // protects inflight
	inflight map[cacheKey]*call // queries being sent, shared by identical lookups

	stats counters
}

// serverSet is the servers and search domains of a resolver at one time.
type serverSet struct {
	servers []netip.AddrPort
	search  []string
}

// Stats is a snapshot of a resolver's counters since it was created.
type Stats struct {
	Lookups     uint64 // LookupNetIP calls for a name, IP literals excluded
	Failures    uint64 // lookups that ended in an error other than ErrNotFound
	QueriesSent uint64 // DNS messages written to servers, UDP and TCP; for System, lookups passed on
	TCPQueries  uint64 // of QueriesSent, those over TCP after a truncated answer
	CacheHits   uint64 // (name, type) answers taken from the cache
	Shared      uint64 // (name, type) answers taken from an identical lookup in flight
}

type counters struct {
	lookups, failures, queriesSent, tcpQueries, cacheHits, shared atomic.Uint64
}

// New returns the resolver described by cfg. It copies the slices of cfg.
func New(cfg Config) *Resolver {
	r := &Resolver{
		name:     cfg.Name,
		timeouts: slices.Clone(cfg.Timeouts),
		dial:     cfg.Dial,
		log:      cfg.Logger,
		now:      time.Now,
		inflight: make(map[cacheKey]*call),
	}
	r.set.Store(newServerSet(cfg.Servers, cfg.Search))
	if len(r.timeouts) == 0 {
		r.timeouts = slices.Clone(defaultTimeouts)
	}
	if r.dial == nil {
		r.dial = (&net.Dialer{}).DialContext
	}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	r.log = r.log.With(logkey.Component, "dns", logkey.AccessPoint, cfg.Name)

	size := cfg.CacheSize
	if size == 0 {
		size = defaultCacheSize
	}
	if size > 0 {
		r.cache = newCache(size)
	}
	return r
}

func newServerSet(servers []netip.AddrPort, search []string) *serverSet {
	set := &serverSet{servers: slices.Clone(servers)}
	for _, s := range search {
		s = strings.Trim(s, ".")
		if s != "" {
			set.search = append(set.search, s)
		}
	}
	return set
}

// current returns the servers and search domains in use now.
func (r *Resolver) current() *serverSet {
	if set := r.set.Load(); set != nil {
		return set
	}
	return &serverSet{}
}

// Servers returns the servers of r in the order they are asked. It returns
// nil for the system resolver.
func (r *Resolver) Servers() []netip.AddrPort {
	return slices.Clone(r.current().servers)
}

// Search returns the search domains of r, without trailing dots.
func (r *Resolver) Search() []string {
	return slices.Clone(r.current().search)
}

// SetServers replaces the servers and search domains of r, for an access
// point whose servers come from the system and change with the link. It
// drops the cached answers when anything changed, since they came from
// the old servers. Lookups already sending keep to the old servers. It
// reports whether anything changed.
func (r *Resolver) SetServers(servers []netip.AddrPort, search []string) bool {
	next := newServerSet(servers, search)
	old := r.current()
	if slices.Equal(old.servers, next.servers) && slices.Equal(old.search, next.search) {
		return false
	}
	r.set.Store(next)
	r.Flush()
	return true
}

// Flush drops every cached answer, for when the access point's network
// changed and old answers may point to places it no longer reaches.
// Queries in flight still complete and cache their answers.
func (r *Resolver) Flush() {
	if r.cache != nil {
		r.cache.clear()
	}
}

// Stats returns the current counters of r.
func (r *Resolver) Stats() Stats {
	return Stats{
		Lookups:     r.stats.lookups.Load(),
		Failures:    r.stats.failures.Load(),
		QueriesSent: r.stats.queriesSent.Load(),
		TCPQueries:  r.stats.tcpQueries.Load(),
		CacheHits:   r.stats.cacheHits.Load(),
		Shared:      r.stats.shared.Load(),
	}
}

// LookupNetIP returns the addresses of host: its IPv4 addresses first, then
// its IPv6 addresses, each group in the order of the answer. An IP literal
// is returned as is without a query. A host with a trailing dot is tried
// only as written; otherwise the search domains apply as described on
// Config.Search. A and AAAA are asked concurrently, and one of them having
// no records is fine as long as the other has some.
//
// The search stops at the first name that has addresses, and also at the
// first name whose servers gave no usable answer, since trying more names
// on silent servers would multiply the wait. Errors are *Error.
func (r *Resolver) LookupNetIP(ctx context.Context, host string) ([]netip.Addr, error) {
	if addr, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{addr}, nil
	}
	r.stats.lookups.Add(1)

	addrs, err := r.lookup(ctx, host)
	if err != nil {
		if !errors.Is(err, ErrNotFound) {
			r.stats.failures.Add(1)
		}
		return nil, &Error{Name: host, AccessPoint: r.name, Servers: r.Servers(), Err: err}
	}
	return addrs, nil
}

func (r *Resolver) lookup(ctx context.Context, host string) ([]netip.Addr, error) {
	if r.system != nil {
		return r.lookupSystem(ctx, host)
	}
	if !isValidHost(host) {
		return nil, ErrInvalidName
	}
	if len(r.current().servers) == 0 {
		return nil, fmt.Errorf("%w: no servers configured", ErrNoAnswer)
	}

	for _, name := range r.candidates(host) {
		addrs, err := r.lookupName(ctx, name)
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		return addrs, nil
	}
	return nil, ErrNotFound
}

// lookupName queries A and AAAA for one fully qualified name and merges them.
func (r *Resolver) lookupName(ctx context.Context, name string) ([]netip.Addr, error) {
	v4, v4Err, v6, v6Err := r.lookupBoth(ctx, name)

	addrs := make([]netip.Addr, 0, len(v4.addrs)+len(v6.addrs))
	addrs = append(addrs, v4.addrs...)
	addrs = append(addrs, v6.addrs...)
	if len(addrs) > 0 {
		// One family failing while the other has records still gives the
		// caller something to dial, as the Go resolver does.
		if (v4Err != nil || v6Err != nil) && r.log.Enabled(ctx, slog.LevelDebug) {
			r.log.LogAttrs(ctx, slog.LevelDebug, "partial answer",
				slog.String(logkey.Target, name), slog.Any("a_err", v4Err), slog.Any("aaaa_err", v6Err))
		}
		return addrs, nil
	}

	// NXDOMAIN for either type means the name does not exist at all.
	// Otherwise a failure outweighs NODATA, because the failed type may
	// have had records; the A failure is reported first.
	if v4.nxdomain || v6.nxdomain {
		return nil, ErrNotFound
	}
	for _, err := range []error{v4Err, v6Err} {
		if err != nil && !errors.Is(err, ErrNotFound) {
			return nil, err
		}
	}
	return nil, ErrNotFound
}

// lookupBoth returns the A and AAAA answers for name, concurrently. When
// both are cached it starts no goroutine, which keeps cache hits cheap.
func (r *Resolver) lookupBoth(ctx context.Context, name string) (v4 answer, v4Err error, v6 answer, v6Err error) {
	if r.cache != nil {
		key := strings.ToLower(name)
		now := r.now()
		cached4, ok4 := r.cache.get(cacheKey{name: key, qtype: dnsmsg.TypeA}, now)
		cached6, ok6 := r.cache.get(cacheKey{name: key, qtype: dnsmsg.TypeAAAA}, now)
		if ok4 && ok6 {
			r.stats.cacheHits.Add(2)
			return cached4, cached4.err(), cached6, cached6.err()
		}
	}

	v6Done := make(chan struct{})
	go func() {
		defer close(v6Done)
		v6, v6Err = r.lookupType(ctx, name, dnsmsg.TypeAAAA)
	}()
	v4, v4Err = r.lookupType(ctx, name, dnsmsg.TypeA)
	<-v6Done
	return v4, v4Err, v6, v6Err
}

// candidates returns the fully qualified names to try for host, in order.
func (r *Resolver) candidates(host string) []string {
	if strings.HasSuffix(host, ".") {
		return []string{host}
	}

	search := r.current().search
	names := make([]string, 0, len(search)+1)
	for _, s := range search {
		if name := host + "." + s + "."; isValidHost(name) {
			names = append(names, name)
		}
	}
	if strings.Contains(host, ".") {
		return append([]string{host + "."}, names...)
	}
	return append(names, host+".")
}

// isValidHost reports whether host can be sent as a query name. That is a
// domain name of at most 253 characters (plus a final dot) with no empty
// label. It must also have no characters that the DNS presentation format
// reads as escapes or separators, because miekg/dns parses names in it.
func isValidHost(host string) bool {
	name := strings.TrimSuffix(host, ".")
	if name == "" || len(name) > 253 {
		return false
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; c <= ' ' || c >= 0x7f || c == '\\' || c == '"' || c == '(' || c == ')' || c == ';' || c == '@' || c == '$' {
			return false
		}
	}
	_, ok := dnsmsg.IsDomainName(name)
	return ok
}
