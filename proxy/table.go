package proxy

import (
	"cmp"
	"net"
	"slices"
	"sync"
	"time"

	"iapd/internal/logkey"
	"iapd/policy"
)

// ConnInfo is one row of the connection table: a live upstream connection
// and the app and access point it is counted against.
type ConnInfo struct {
	ID          uint64
	App         string
	Listener    string // listen address of the listener the client came in on
	Target      string // host:port as the client sent it
	Destination string // destination whose plan chose the access point
	AccessPoint string
	Interface   string
	Started     time.Time
	BytesUp     int64 // client to target
	BytesDown   int64 // target to client
	// Reason says why iapd closed the connection, like "idle for 1h0m0s";
	// empty while it is open and when one of its ends closed it.
	Reason string
}

// table is the set of live upstream connections, and the count of each
// app's and access point's connections against their caps. The zero value
// is ready to use and it is safe for concurrent use.
type table struct {
	mu     sync.Mutex
	conns  map[uint64]*upstream // guarded by mu
	lastID uint64               // guarded by mu
	closed bool                 // guarded by mu; set once the server closes

	// perApp and perAccessPoint count open connections and dials in
	// progress, by name, for the apps and access points that have a cap.
	perApp         map[string]int // guarded by mu
	perAccessPoint map[string]int // guarded by mu
}

// add gives u its ID and enters it, and reports false when the table is
// closed, in which case the caller must close u.
func (t *table) add(u *upstream) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	if t.conns == nil {
		t.conns = make(map[uint64]*upstream)
	}
	t.lastID++
	u.info.ID = t.lastID
	t.conns[u.info.ID] = u
	return true
}

// remove takes u out of the table and gives back its claims on the caps.
func (t *table) remove(u *upstream) {
	t.mu.Lock()
	delete(t.conns, u.info.ID)
	t.releaseLocked(u.claim)
	t.mu.Unlock()
}

// list returns the rows ordered by ID, which is the order they were opened.
func (t *table) list() []ConnInfo {
	t.mu.Lock()
	rows := make([]ConnInfo, 0, len(t.conns))
	for _, u := range t.conns {
		rows = append(rows, u.snapshot())
	}
	t.mu.Unlock()

	slices.SortFunc(rows, func(a, b ConnInfo) int { return cmp.Compare(a.ID, b.ID) })
	return rows
}

// closeMatching closes every connection for which match returns true,
// giving reason as the cause, and returns how many it closed. With
// closeTable it also refuses later adds.
func (t *table) closeMatching(match func(*upstream) bool, closeTable bool, reason string) int {
	t.mu.Lock()
	if closeTable {
		t.closed = true
	}
	var doomed []*upstream
	for _, u := range t.conns {
		if match(u) {
			doomed = append(doomed, u)
		}
	}
	t.mu.Unlock()

	// Close takes the lock again to leave the table.
	for _, u := range doomed {
		u.closeWithReason(reason)
	}
	return len(doomed)
}

// track enters c, dialled through ap of destination d for app, into the
// connection table and returns it wrapped. The upstream takes over cl, the
// dial's claim on the caps, and gives it back when it closes. When the
// server is already closed, the returned upstream is closed too, so that
// the caller's first read or write fails.
func (s *Server) track(c net.Conn, app *policy.App, d *policy.Destination, l *policy.Listener, target string, ap *policy.AccessPoint, cl claim) *upstream {
	u := &upstream{Conn: c, s: s, claim: cl}
	u.lastActive.Store(time.Now().UnixNano())
	u.info = ConnInfo{
		Target:      target,
		AccessPoint: ap.Name,
		Interface:   s.cfg.Network.Interface(ap),
		Started:     time.Now(),
	}
	if app != nil {
		u.info.App = app.Name
	}
	if d != nil {
		u.info.Destination = d.Name
	}
	if l != nil {
		u.info.Listener = l.Listen
	}

	if !s.table.add(u) {
		u.Close()
	}
	return u
}

// Conns returns a snapshot of the connection table, oldest first.
func (s *Server) Conns() []ConnInfo { return s.table.list() }

// CloseConn closes the connection with the given ID and reports whether
// there was one.
func (s *Server) CloseConn(id uint64) bool {
	n := s.table.closeMatching(func(u *upstream) bool { return u.info.ID == id }, false, "closed on request")
	if n > 0 {
		s.logger.Info("closed connection on request", "id", id)
	}
	return n > 0
}

// CloseAccessPoint closes the open connections that go through the access
// point named ap, so that their clients reconnect instead of waiting on a
// way out that is gone. It returns how many it closed.
func (s *Server) CloseAccessPoint(ap string) int {
	n := s.table.closeMatching(func(u *upstream) bool { return u.info.AccessPoint == ap }, false, "access point "+ap+" went away")
	if n > 0 {
		s.logger.Info("closed connections of access point", logkey.AccessPoint, ap, "count", n)
	}
	return n
}

// CloseConns closes the open connections whose row match accepts, and
// returns how many it closed. match must not block: it runs with the
// table locked.
func (s *Server) CloseConns(match func(ConnInfo) bool) int {
	return s.table.closeMatching(func(u *upstream) bool { return match(u.info) }, false, "closed by the connection manager")
}
