package admin

import (
	"cmp"
	"slices"
	"sync"
	"time"

	"iapd/proxy"
)

// latencyWeight is the weight of the newest connect time in the smoothed
// latency of an access point, as in TCP's smoothed round-trip time
// (RFC 6298 uses 1/8).
const latencyWeight = 0.125

// Usage counts the connections and bytes of every app on every access point
// since iapd started. Open connections count with the bytes they have moved
// so far: each look at the connection table adds what moved since the last
// look, and a closing connection adds the rest, so the totals only grow. It
// is safe for concurrent use; create it with NewUsage.
type Usage struct {
	conns func() []proxy.ConnInfo

	mu       sync.Mutex            // protects everything below
	seen     map[uint64]seenConn   // open connections counted so far, by ID
	totals   map[usageKey]*counter // by app and access point
	failures map[string]uint64     // failed dial attempts by access point
	latency  map[string]float64    // smoothed connect time in milliseconds, by access point
}

type usageKey struct{ app, accessPoint string }

type seenConn struct {
	key      usageKey
	up, down int64 // bytes already added to the totals
}

type counter struct {
	total    uint64 // connections opened
	open     int    // open at the last look
	up, down int64
}

// NewUsage returns a Usage that reads open connections from conns.
func NewUsage(conns func() []proxy.ConnInfo) *Usage {
	return &Usage{
		conns:    conns,
		seen:     make(map[uint64]seenConn),
		totals:   make(map[usageKey]*counter),
		failures: make(map[string]uint64),
		latency:  make(map[string]float64),
	}
}

// Closed adds the final counts of a connection that left the table. It is
// meant for proxy.Config.OnClose.
func (u *Usage) Closed(c proxy.ConnInfo) {
	u.mu.Lock()
	defer u.mu.Unlock()
	prev, ok := u.seen[c.ID]
	key := usageKey{c.App, c.AccessPoint}
	ctr := u.counterLocked(key)
	if !ok {
		ctr.total++
	}
	ctr.up += c.BytesUp - prev.up
	ctr.down += c.BytesDown - prev.down
	delete(u.seen, c.ID)
}

// DialAttempt records the outcome of one dial attempt. It is meant for
// proxy.Config.OnDialAttempt.
func (u *Usage) DialAttempt(a proxy.DialAttempt) {
	if a.AccessPoint == "" {
		return
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if a.Err != nil {
		u.failures[a.AccessPoint]++
		return
	}
	ms := float64(a.Duration) / float64(time.Millisecond)
	if old, ok := u.latency[a.AccessPoint]; ok {
		ms = old + latencyWeight*(ms-old)
	}
	u.latency[a.AccessPoint] = ms
}

func (u *Usage) counterLocked(key usageKey) *counter {
	ctr, ok := u.totals[key]
	if !ok {
		ctr = &counter{}
		u.totals[key] = ctr
	}
	return ctr
}

// syncLocked adds what the open connections moved since the last look.
// The table is read under mu, so that a connection cannot close between
// the read and the update and be counted twice.
func (u *Usage) syncLocked() {
	for _, ctr := range u.totals {
		ctr.open = 0
	}
	for _, c := range u.conns() {
		key := usageKey{c.App, c.AccessPoint}
		ctr := u.counterLocked(key)
		prev, ok := u.seen[c.ID]
		if !ok {
			ctr.total++
		}
		ctr.open++
		ctr.up += c.BytesUp - prev.up
		ctr.down += c.BytesDown - prev.down
		u.seen[c.ID] = seenConn{key: key, up: c.BytesUp, down: c.BytesDown}
	}
}

// UsageRow is the count of one app on one access point.
type UsageRow struct {
	App         string
	AccessPoint string
	Open        int
	Total       uint64
	BytesUp     int64
	BytesDown   int64
}

// Rows returns the counts of every app and access point pair that carried
// a connection, ordered by app and then access point.
func (u *Usage) Rows() []UsageRow {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.syncLocked()
	rows := make([]UsageRow, 0, len(u.totals))
	for key, ctr := range u.totals {
		rows = append(rows, UsageRow{App: key.app, AccessPoint: key.accessPoint, Open: ctr.open, Total: ctr.total, BytesUp: ctr.up, BytesDown: ctr.down})
	}
	slices.SortFunc(rows, func(a, b UsageRow) int {
		return cmp.Or(cmp.Compare(a.App, b.App), cmp.Compare(a.AccessPoint, b.AccessPoint))
	})
	return rows
}

// ByAccessPoint returns the counts summed over apps, by access point.
func (u *Usage) ByAccessPoint() map[string]UsageRow {
	sums := make(map[string]UsageRow)
	for _, r := range u.Rows() {
		sum := sums[r.AccessPoint]
		sum.AccessPoint = r.AccessPoint
		sum.Open += r.Open
		sum.Total += r.Total
		sum.BytesUp += r.BytesUp
		sum.BytesDown += r.BytesDown
		sums[r.AccessPoint] = sum
	}
	return sums
}

// ByApp returns each app's counts per access point.
func (u *Usage) ByApp() map[string][]AppOnAccessPoint {
	apps := make(map[string][]AppOnAccessPoint)
	for _, r := range u.Rows() {
		apps[r.App] = append(apps[r.App], AppOnAccessPoint{
			AccessPoint: r.AccessPoint,
			Connections: r.Open,
			Total:       r.Total,
			BytesUp:     r.BytesUp,
			BytesDown:   r.BytesDown,
		})
	}
	return apps
}

// DialFailures returns how many dial attempts through the access point
// named ap failed.
func (u *Usage) DialFailures(ap string) uint64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.failures[ap]
}

// Latency returns the smoothed time to connect through the access point
// named ap, in milliseconds, and false when no connection has been made
// through it yet.
func (u *Usage) Latency(ap string) (float64, bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	ms, ok := u.latency[ap]
	return ms, ok
}
