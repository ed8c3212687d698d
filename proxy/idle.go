package proxy

import (
	"fmt"
	"net"
	"time"

	"iapd/internal/logkey"
)

// Bounds of the period of the idle sweep, a quarter of the idle timeout:
// an idle connection closes at most that much later than its timeout.
const (
	minIdleSweep = 10 * time.Millisecond
	maxIdleSweep = 30 * time.Second
)

// sweepIdle closes, until s closes, the connections on which no byte has
// moved either way for the idle timeout. It follows SetLimits: with no
// idle timeout it only waits for one.
func (s *Server) sweepIdle() {
	defer s.sweeps.Done()
	timer := time.NewTimer(maxIdleSweep)
	defer timer.Stop()
	for {
		timeout := s.currentLimits().IdleTimeout
		period := maxIdleSweep
		if timeout > 0 {
			period = min(max(timeout/4, minIdleSweep), maxIdleSweep)
		}
		timer.Reset(period)
		select {
		case <-s.ctx.Done():
			return
		case <-s.limitsChanged:
			timer.Stop()
		case now := <-timer.C:
			if timeout > 0 {
				s.closeIdle(now, timeout)
			}
		}
	}
}

// closeIdle closes the connections idle for timeout at now and returns how
// many it closed.
func (s *Server) closeIdle(now time.Time, timeout time.Duration) int {
	var idle []*upstream
	// The checks run outside the table's lock: each may ask the kernel.
	for _, u := range s.table.all() {
		if u.idleFor(now) >= timeout {
			idle = append(idle, u)
		}
	}

	reason := fmt.Sprintf("idle for %s", timeout)
	for _, u := range idle {
		s.logger.Debug("closing idle connection", logkey.App, u.info.App, logkey.AccessPoint, u.info.AccessPoint, logkey.Target, u.info.Target)
		u.closeWithReason(reason)
	}
	s.stats.idleClosed.Add(uint64(len(idle)))
	return len(idle)
}

// idleFor returns how long no byte has moved over u at now, as far as the
// sweep can tell. The relay's byte counts advance only as bytes leave its
// pipe, so on Linux the kernel's own record of the last data sent and
// received (TCP_INFO, see tcp(7)) shortens the answer.
func (u *upstream) idleFor(now time.Time) time.Duration {
	total := u.up.Load() + u.down.Load()
	if total != u.lastTotal.Load() {
		u.lastTotal.Store(total)
		u.lastActive.Store(now.UnixNano())
	}
	idle := now.Sub(time.Unix(0, u.lastActive.Load()))
	if tcp, isTCP := u.Conn.(*net.TCPConn); isTCP {
		if k, ok := kernelIdle(tcp); ok && k < idle {
			idle = k
		}
	}
	return idle
}

// all returns the connections in the table, in no order.
func (t *table) all() []*upstream {
	t.mu.Lock()
	defer t.mu.Unlock()
	conns := make([]*upstream, 0, len(t.conns))
	for _, u := range t.conns {
		conns = append(conns, u)
	}
	return conns
}
