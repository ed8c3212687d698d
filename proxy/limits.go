package proxy

import (
	"fmt"
	"sync"

	"iapd/internal/logkey"
	"iapd/policy"
)

// claim is a connection's hold on its app's and its access point's caps.
// A dial takes it before connecting, so that concurrent dials cannot
// overrun a cap, and the upstream gives it back when it closes. The zero
// value holds nothing.
type claim struct {
	app         string // app whose cap is held; empty when none
	accessPoint string // access point whose cap is held; empty when none
	priority    int    // of the app, for choosing whom to displace
}

// claimApp takes one connection of app's cap. It reports false when the
// app already has MaxConnections connections open or being dialled.
func (t *table) claimApp(app *policy.App) (claim, bool) {
	if app.MaxConnections <= 0 {
		return claim{priority: app.Priority}, true
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.perApp[app.Name] >= app.MaxConnections {
		return claim{}, false
	}
	if t.perApp == nil {
		t.perApp = make(map[string]int)
	}
	t.perApp[app.Name]++
	return claim{app: app.Name, priority: app.Priority}, true
}

// claimAccessPoint takes one connection of ap's cap for a connection of
// the given priority, and reports whether it counted one: an access point
// without a cap counts nothing. When ap is full, it picks a connection of
// an app with a lower priority to make room: of the lowest priority, the
// one opened last, because it has the least work to lose. The victim is
// marked so that no other dial picks it, and the caller must close it once
// the new connection is dialled, or give it back with releaseAccessPoint
// when the dial fails. ok is false when ap is full and nothing can be
// displaced.
//
// NOTE: from the claim until the victim's Close, ap holds one connection
// more than its cap, for as long as the new connection's dial takes.
func (t *table) claimAccessPoint(ap *policy.AccessPoint, priority int) (victim *upstream, counted, ok bool) {
	if ap.MaxConnections <= 0 {
		return nil, false, true
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.perAccessPoint[ap.Name] >= ap.MaxConnections {
		victim = t.victimLocked(ap.Name, priority)
		if victim == nil {
			return nil, false, false
		}
		victim.displaced = true
	}
	if t.perAccessPoint == nil {
		t.perAccessPoint = make(map[string]int)
	}
	t.perAccessPoint[ap.Name]++
	return victim, true, true
}

// victimLocked returns the connection on the access point named ap to close
// for a new one of the given priority, or nil when every connection there
// has that priority or a higher one.
func (t *table) victimLocked(ap string, priority int) *upstream {
	var victim *upstream
	for _, u := range t.conns {
		if u.claim.accessPoint != ap || u.displaced || u.claim.priority >= priority {
			continue
		}
		if victim == nil || u.claim.priority < victim.claim.priority ||
			u.claim.priority == victim.claim.priority && u.info.ID > victim.info.ID {
			victim = u
		}
	}
	return victim
}

// releaseAccessPoint gives back a connection of the cap of the access
// point named ap, which claimAccessPoint counted, after a dial through it
// failed, and lets the victim picked for it, if any, be picked again.
func (t *table) releaseAccessPoint(ap string, victim *upstream) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if victim != nil {
		victim.displaced = false
	}
	t.releaseLocked(claim{accessPoint: ap})
}

// release gives back everything cl holds, for a dial that failed.
func (t *table) release(cl claim) {
	t.mu.Lock()
	t.releaseLocked(cl)
	t.mu.Unlock()
}

func (t *table) releaseLocked(cl claim) {
	if cl.app != "" {
		decrement(t.perApp, cl.app)
	}
	if cl.accessPoint != "" {
		decrement(t.perAccessPoint, cl.accessPoint)
	}
}

// decrement lowers m[key] and deletes it at zero, so that the maps keep
// only names with connections, also across policy reloads.
func decrement(m map[string]int, key string) {
	if m[key] <= 1 {
		delete(m, key)
		return
	}
	m[key]--
}

// displace closes victim to make room on its access point for a
// connection of app, and logs why.
func (s *Server) displace(victim *upstream, app *policy.App) {
	reason := fmt.Sprintf("displaced by app %s with priority %d", app.Name, app.Priority)
	s.stats.displaced.Add(1)
	s.logger.Info("connection displaced",
		logkey.App, victim.info.App, logkey.AccessPoint, victim.info.AccessPoint, logkey.Target, victim.info.Target,
		"priority", victim.claim.priority, "by_app", app.Name, "by_priority", app.Priority)
	victim.closeWithReason(reason)
}

// capGate holds the access point caps for the attempts of one dial. An
// attempt enters its access point's cap before it dials, leaves it when it
// fails, and the attempt that wins keeps it. It is safe for the concurrent
// attempts of a race.
type capGate struct {
	s      *Server
	app    *policy.App
	target string

	mu      sync.Mutex
	entered map[*policy.AccessPoint]gateEntry // guarded by mu
}

// gateEntry is the hold of one attempt on its access point's cap.
type gateEntry struct {
	counted bool      // the cap counts this attempt; false for an access point without one
	victim  *upstream // to close when the attempt wins; nil for none
}

func newCapGate(s *Server, app *policy.App, target string) *capGate {
	return &capGate{s: s, app: app, target: target, entered: make(map[*policy.AccessPoint]gateEntry)}
}

// enter takes one connection of ap's cap for an attempt, or returns the
// error of an access point that is full.
func (g *capGate) enter(ap *policy.AccessPoint) *DialError {
	victim, counted, ok := g.s.table.claimAccessPoint(ap, g.app.Priority)
	if !ok {
		err := fmt.Errorf("%w (max_connections %d)", ErrAccessPointFull, ap.MaxConnections)
		return &DialError{Op: "admit", AccessPoint: ap.Name, Interface: g.s.cfg.Network.Interface(ap), Target: g.target, Err: err}
	}
	g.mu.Lock()
	g.entered[ap] = gateEntry{counted: counted, victim: victim}
	g.mu.Unlock()
	return nil
}

// leave gives back what the attempt through ap entered, after it failed or
// lost a race.
func (g *capGate) leave(ap *policy.AccessPoint) {
	g.mu.Lock()
	e, ok := g.entered[ap]
	delete(g.entered, ap)
	g.mu.Unlock()
	if ok && e.counted {
		g.s.table.releaseAccessPoint(ap.Name, e.victim)
	}
}

// won keeps the hold of the winning attempt through ap for its connection
// and returns the access point name that its claim must carry, "" when the
// access point has no cap, and the connection to displace, if any.
func (g *capGate) won(ap *policy.AccessPoint) (claimed string, victim *upstream) {
	g.mu.Lock()
	e := g.entered[ap]
	delete(g.entered, ap)
	g.mu.Unlock()
	if !e.counted {
		return "", nil
	}
	return ap.Name, e.victim
}
